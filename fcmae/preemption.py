"""Stopping a run cleanly when its scheduler asks: a signal (Slurm's ``--signal=USR1@120``)
only sets a flag; the training loop checks it at every optimizer step (on all ranks
together), saves a mid-epoch checkpoint there and raises :class:`Preempted`. SIGINT and
SIGTERM stop at once instead (see ``fcmae.cli.run_or_exit``)."""
from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = ("USR1", "USR2", "none")

_requested: list[tuple[str, float]] = []     # (signal name, when), once requested


class Preempted(BaseException):
    """The run stopped at a step boundary on the preemption signal, its checkpoint saved."""

    def __init__(self, epoch: int, step: int, checkpoint: str) -> None:
        name, when = _requested[0] if _requested else ("USR1", time.time())
        super().__init__(f"SIG{name} received at {time.strftime('%H:%M:%S', time.localtime(when))}: stopped after "
                         f"step {step} (epoch {epoch}), checkpoint {checkpoint} saved")
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint
        self.requeued: str | None = None     # the Slurm job id, once requeued


def requested() -> str | None:
    """The name of the preemption signal received (e.g. ``"USR1"``), or None."""
    return _requested[0][0] if _requested else None


def request(name: str = "USR1") -> None:
    """Ask the run to stop at its next step boundary, as the signal does."""
    if not _requested:
        _requested.append((name, time.time()))


@contextmanager
def handling(signal_name: str) -> Iterator[None]:
    """While inside, ``SIG<signal_name>`` requests a stop instead of killing the process
    (``"none"``: the signal keeps its default action)."""
    if signal_name == "none":
        yield
        return
    number = getattr(signal, f"SIG{signal_name}")
    _requested.clear()
    previous = signal.signal(number, lambda signum, frame: request(signal_name))
    try:
        yield
    finally:
        signal.signal(number, previous)
        _requested.clear()
