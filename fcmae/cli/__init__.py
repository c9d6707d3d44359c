"""Command-line entry points: argument parsing only; the work lives in the package."""
import argparse
import math
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from ..models.dcnv3_ops import DCNV3_IMPLS, DEFAULT_DCNV3_IMPL


class Terminated(BaseException):
    """SIGTERM, raised where the process is (like KeyboardInterrupt for SIGINT), so that writes
    in progress are abandoned atomically and the run ends with a message."""


def _raise_terminated(signum, frame) -> NoReturn:
    raise Terminated()


def run_or_exit(prog: str, job: Callable[[], object], user_errors: tuple[type[BaseException], ...]) -> object:
    """Run ``job``; a user error becomes one line on stderr and exit code 2; SIGINT and SIGTERM
    end it with one line saying where it stopped, exit code 130 and 143."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return job()
    except user_errors as error:
        _fail(prog, error)
    except (KeyboardInterrupt, Terminated) as interrupt:
        where = getattr(interrupt, "progress", None)
        resume = f" at epoch {where[0]}, step {where[1]}; resume with --resume auto" if where else ""
        print(f"{prog}: interrupted{resume}", file=sys.stderr)
        raise SystemExit(143 if isinstance(interrupt, Terminated) else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def number(kind: type = float, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], float | int]:
    """An argparse ``type``: a finite ``kind`` (int or float) in the range [low, high]
    (``low_open``/``high_open`` exclude the end). Out of range is argparse's one-line error,
    before any data is read."""
    lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    upper = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    wanted = f"a finite {'whole ' if kind is int else ''}number" + \
        (f" {lower}" if lower else "") + (" and" if lower and upper else "") + (f" {upper}" if upper else "")

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if (not math.isfinite(value)
                or (low is not None and (value < low or (low_open and value == low)))
                or (high is not None and (value > high or (high_open and value == high)))):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse


POSITIVE_INT = number(int, 1)
NON_NEGATIVE_INT = number(int, 0)
POSITIVE = number(float, 0, low_open=True)
NON_NEGATIVE = number(float, 0)
PROBABILITY = number(float, 0, 1)
SEED = number(int, 0, 2 ** 31 - 1)


def add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    """How the model runs, not what it computes (shared by pretraining and fine-tuning)."""
    parser.add_argument("--grad-checkpointing", "--grad_checkpointing", action="store_true",
                        help="recompute each block's activations in backward instead of keeping them "
                             "(ConvNeXt V2, InternImage)")
    parser.add_argument("--dcn-impl", "--dcn_impl", choices=DCNV3_IMPLS, default=None,
                        help=f"InternImage only: DCNv3 sampling (default {DEFAULT_DCNV3_IMPL}); "
                             "'triton': fused Triton kernels, CUDA only")


def _fail(prog: str, error: BaseException) -> NoReturn:
    lines = [line for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and "Original Traceback" in str(error):
        # re-raised from a DataLoader worker: the cause is the last line of the worker's traceback
        lines = [lines[-1].split(": ", 1)[-1]]
    message = lines[0] if lines else type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
