"""Run logs: TensorBoard scalars and images, and a JSONL file, written by the main process."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from .atomic import atomic_write

LOG_FILE = "log.jsonl"


class RunLogger:
    """Rank-0 logger writing ``log.jsonl`` and TensorBoard events to ``log_dir``.

    On other ranks every method is a no-op, so callers need no rank checks.
    """

    def __init__(self, log_dir: str | os.PathLike | None, enabled: bool = True,
                 resume_step: int | None = None) -> None:
        """``resume_step``: the run continues after this global step (0: a fresh start), so
        records of later steps (written before an interruption, or by a run started over) are
        dropped from ``log.jsonl`` and TensorBoard."""
        self.enabled = enabled and log_dir is not None
        self.writer = None
        self.jsonl = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            jsonl_path = Path(log_dir) / LOG_FILE
            if resume_step is not None and jsonl_path.is_file():
                _truncate_jsonl(jsonl_path, resume_step)
            self.writer = SummaryWriter(log_dir=str(log_dir),
                                        purge_step=None if resume_step is None else resume_step + 1)
            self.jsonl = open(jsonl_path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any], step: int, prefix: str = "train") -> None:
        """Append ``record`` as one JSON line and each numeric value as a scalar."""
        if not self.enabled:
            return
        finite = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
                  for key, value in record.items()}   # JSON has no NaN/Infinity: write null
        self.jsonl.write(json.dumps({"step": step, **finite}, allow_nan=False) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def log_image(self, tag: str, image: Tensor, step: int) -> None:
        if self.enabled:
            self.writer.add_image(tag, image, step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of ``path`` up to ``last_step``; a torn last line is dropped too."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line + "\n")
    atomic_write(path, lambda file: file.write("".join(kept).encode("utf-8")))
