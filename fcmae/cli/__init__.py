"""Command-line entry points: argument parsing only; the work lives in the package."""
import argparse
import copy
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

from .. import distributed
from ..checkpoint import CheckpointError
from ..data import DataError
from ..distributed import describe_launch
from ..engine import AMP_DTYPES, NonFiniteLossError
from ..models import list_models
from ..models.registry import add_family_arguments
from ..preemption import SIGNALS, Preempted


class Terminated(BaseException):
    """SIGTERM, raised where the process is (like KeyboardInterrupt for SIGINT), so that writes
    in progress are abandoned atomically and the run ends with a message."""


# A run stopped on its preemption signal and not requeued: 128 + SIGUSR1, as if the signal had
# ended it, though it saved a checkpoint first (a requeued run exits 0: its job goes on).
PREEMPTED_EXIT = 138


def _raise_terminated(signum, frame) -> NoReturn:
    raise Terminated()


def run_or_exit(prog: str, job: Callable[[], object], user_errors: tuple[type[BaseException], ...]) -> object:
    """Run ``job``; a user error becomes one line on stderr and exit code 2; SIGINT and SIGTERM
    end it with one line saying where it stopped, exit code 130 and 143; a stop on the
    preemption signal (checkpoint saved) says so, exit code 0 if the job was requeued, else
    :data:`PREEMPTED_EXIT`."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return job()
    except user_errors as error:
        _fail(prog, error)
    except Preempted as stop:
        requeued = f"; requeued Slurm job {stop.requeued}" if stop.requeued else ""
        print(f"{prog}: {stop}{requeued}; --resume auto continues from it", file=sys.stderr)
        raise SystemExit(0 if stop.requeued else PREEMPTED_EXIT) from None
    except (KeyboardInterrupt, Terminated) as interrupt:
        print(f"{prog}: interrupted{interrupted_where(interrupt)}", file=sys.stderr)
        raise SystemExit(143 if isinstance(interrupt, Terminated) else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_where(interrupt: BaseException) -> str:
    """Where an interrupted run stood and what resuming it does (see ``engine.mark_progress``)."""
    where = getattr(interrupt, "progress", None)
    if where is None:
        return ""
    epoch, step = where
    checkpoint = getattr(interrupt, "checkpoint", None)
    if checkpoint is None:
        return (f" at epoch {epoch}, step {step}, before the first checkpoint: nothing to resume "
                f"(--resume auto starts over)")
    return f" at epoch {epoch}, step {step}; --resume auto continues from {checkpoint}"


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default (unless it is None or off), flags without help
    text included (tests/test_cli_help.py walks every command)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return not (action.default is None or action.default is False or action.default is argparse.SUPPRESS)

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and self._shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return super()._get_help_string(action) if self._shows_default(action) else action.help


def check_output_file(output: str, suffixes: tuple[str, ...]) -> Path:
    """``-o`` of a command writing one picture: its folder exists and its suffix is one of
    ``suffixes`` — checked before any work, so a bad name costs nothing and writes nothing."""
    path = Path(output)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"-o {path}: folder {path.parent} does not exist")
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"-o {path}: name a {' or '.join(suffixes)} file")
    if path.is_dir() or path.is_symlink():
        raise FileExistsError(f"-o {path} is a {'folder' if path.is_dir() else 'symbolic link'}; name a new file")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"-o {path}: folder {path.parent} is not writable")
    return path


def add_training_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags pretraining and fine-tuning share (each command sets its own defaults with
    ``parser.set_defaults``), every model family's own options, and ``--log-level``."""
    add = parser.add_argument
    add("--model", default="convnextv2_atto", help=f"one of {', '.join(list_models())}")
    add("--shard-index", "--shard_index", default=None,
        help="shards.json written by fcmae-shards (sample counts, class names); needed for pipe: shards, "
             "found beside local shards")
    add("--output-dir", "--output_dir", help="checkpoints go here")
    add("--log-dir", "--log_dir", default=None, help="TensorBoard events and log.jsonl (default: --output-dir)")
    add("--epochs", type=POSITIVE_INT)
    add("--batch-size", "--batch_size", type=POSITIVE_INT, help="per process")
    add("--accum-iter", "--accum_iter", type=POSITIVE_INT, default=1, help="gradient accumulation steps")
    add("--blr", type=POSITIVE, help="base lr; lr = blr * effective batch / 256")
    add("--lr", type=NON_NEGATIVE, default=None, help="absolute lr (overrides --blr)")
    add("--min-lr", "--min_lr", type=NON_NEGATIVE, help="final lr of the cosine schedule")
    add("--warmup-epochs", "--warmup_epochs", type=NON_NEGATIVE, help="linear lr warmup from 0")
    add("--weight-decay", "--weight_decay", type=NON_NEGATIVE, default=0.05,
        help="AdamW weight decay (not applied to biases, norms and what the model exempts)")
    add("--input-size", "--input_size", type=number(int, 32), default=224,
        help="image side in pixels, a multiple of 32")
    add("--amp", choices=list(AMP_DTYPES), default="none", help="autocast dtype (fp16 uses loss scaling)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--clip-grad", "--clip_grad", type=POSITIVE, default=None, help="max global grad norm (omit: no clipping)")
    add("--grad-checkpointing", "--grad_checkpointing", action="store_true",
        help="recompute each block's activations in backward instead of keeping them (not RevCol: reversible)")
    add("--num-workers", "--num_workers", type=NON_NEGATIVE_INT, default=2, help="data loader workers per process")
    add("--seed", type=SEED, default=0)
    add("--resume", default=None, help="checkpoint path, or 'auto' for OUTPUT/checkpoint-last.pth if present "
                                       "(else a fresh start)")
    add("--overwrite", action="store_true",
        help="start a fresh run in an --output-dir that holds one (its checkpoint and logs are replaced)")
    add("--allow-changed-settings", action="store_true",
        help="resume although data, input size, mask ratio, batch size, accumulation or seed differ from "
             "the checkpoint's (the continuation is then not exact)")
    add("--save-every", "--save_every", type=NON_NEGATIVE_INT, default=0,
        help="also keep checkpoint-E.pth every N epochs, E = epochs completed (a hard link to "
             "checkpoint-last.pth, which is always written)")
    add("--steps-per-epoch", "--steps_per_epoch", type=POSITIVE_INT, default=None,
        help="cap optimizer steps per epoch (quick runs)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--threads", type=POSITIVE_INT, default=None,
        help="CPU threads of this process (default: PyTorch's, one per core; give each of several "
             "processes sharing a machine its share)")
    add("--dist-backend", "--dist_backend", choices=["nccl", "gloo"], default=None,
        help="torch.distributed backend under torchrun or srun (default: nccl on GPU, gloo on CPU)")
    add("--preempt-signal", choices=SIGNALS, default="USR1",
        help="on this signal (Slurm: #SBATCH --signal=USR1@120) stop after the optimizer step in progress, "
             "with a checkpoint --resume auto continues exactly, even mid-epoch; 'none': the signal's default")
    add("--requeue", action="store_true",
        help="after stopping on --preempt-signal, requeue this Slurm job (scontrol requeue; submit with "
             "sbatch --requeue) so it starts again and continues with --resume auto")
    add_family_arguments(parser, command)


USER_ERRORS = (CheckpointError, DataError, NonFiniteLossError, ValueError, OSError)


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A command's parser: ``--help`` shows every default (:class:`HelpFormatter`); ``--log-level`` included."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter, description=description)
    add_log_level_argument(parser)
    return parser


def cli_main(build_parser: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], object],
             argv: list[str] | None = None) -> int:
    """The frame of every command: parse ``argv``, set up logging, ``run(args)`` with
    :func:`run_or_exit` (a user error is one line), leave the process group. A non-zero int
    from ``run`` exits with that code; otherwise returns 0 (a console script exits 0)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        result = run_or_exit(parser.prog, lambda: run(args), USER_ERRORS)
    finally:
        distributed.cleanup()
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        raise SystemExit(result)
    return 0


def add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", "--log_level", choices=["debug", "info", "warning", "error"], default="info",
                        help="messages on stderr; processes other than rank 0 show warnings and errors only")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest swaps it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: str = "info") -> None:
    """Messages of the ``fcmae`` loggers go to stderr as plain lines at ``level``; processes
    other than rank 0 (torchrun's ``RANK``, srun's ``SLURM_PROCID``) show warnings and errors only."""
    main_process = describe_launch().rank == 0
    package_logger = logging.getLogger("fcmae")
    for handler in list(package_logger.handlers):
        package_logger.removeHandler(handler)
    package_logger.addHandler(_StderrHandler())
    package_logger.propagate = False
    threshold = getattr(logging, level.upper())
    package_logger.setLevel(threshold if main_process else max(threshold, logging.WARNING))


def _fail(prog: str, error: BaseException) -> NoReturn:
    lines = [line for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and "Original Traceback" in str(error):
        # re-raised from a DataLoader worker: the cause is the last line of the worker's traceback
        lines = [lines[-1].split(": ", 1)[-1]]
    message = lines[0] if lines else type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
