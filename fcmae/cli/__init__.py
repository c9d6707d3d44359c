"""Command-line entry points: argument parsing only; the work lives in the package."""
import argparse
import sys
from typing import Callable, NoReturn

from ..models.dcnv3_ops import DCNV3_IMPLS, DEFAULT_DCNV3_IMPL


def run_or_exit(prog: str, job: Callable[[], object], user_errors: tuple[type[BaseException], ...]) -> object:
    """Run ``job``; a user error becomes one line on stderr and exit code 2."""
    try:
        return job()
    except user_errors as error:
        _fail(prog, error)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    """How the model runs, not what it computes (shared by pretraining and fine-tuning)."""
    parser.add_argument("--grad-checkpointing", "--grad_checkpointing", action="store_true",
                        help="recompute each block's activations in backward instead of keeping them "
                             "(ConvNeXt V2, InternImage)")
    parser.add_argument("--dcn-impl", "--dcn_impl", choices=DCNV3_IMPLS, default=None,
                        help=f"InternImage only: DCNv3 sampling (default {DEFAULT_DCNV3_IMPL}); "
                             "'triton': fused Triton kernels, CUDA only")


def _fail(prog: str, error: BaseException) -> NoReturn:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
