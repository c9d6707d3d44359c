"""What a run needs to know about Slurm: the hosts of a node list, a rendezvous port for a
job, and requeueing the job it runs in. Launching is Slurm's (``srun``); this module only
reads its environment and calls its commands."""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

log = logging.getLogger(__name__)

_RANGE = re.compile(r"^(\d+)-(\d+)$")


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm's compressed host list as host names: ``gpu[01-03,07],cpu1`` → gpu01, gpu02, gpu03,
    gpu07, cpu1 (zero padding kept, several bracket groups in one name expanded in order)."""
    hosts: list[str] = []
    for name in _split_top_level(nodelist):
        expanded = [""]
        for literal, group in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", name):
            parts = [literal]
            if group:
                parts = [literal + item for item in _expand_group(group, nodelist)]
            expanded = [prefix + part for prefix in expanded for part in parts]
        hosts += [host for host in expanded if host]
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split at the commas outside brackets."""
    names, depth, current = [], 0, ""
    for char in nodelist:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"malformed Slurm node list {nodelist!r}")
        if char == "," and depth == 0:
            names.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise ValueError(f"malformed Slurm node list {nodelist!r}")
    return [name for name in names + [current] if name]


def _expand_group(group: str, nodelist: str) -> list[str]:
    items = []
    for item in group.split(","):
        match = _RANGE.match(item)
        if match:
            low, high = match.groups()
            if int(high) < int(low):
                raise ValueError(f"malformed Slurm node list {nodelist!r}: range {item}")
            items += [str(number).zfill(len(low)) for number in range(int(low), int(high) + 1)]
        elif item.isdigit():
            items.append(item)
        else:
            raise ValueError(f"malformed Slurm node list {nodelist!r}: {item!r}")
    return items


def first_host(nodelist: str) -> str:
    """The first host of ``nodelist``: by ``scontrol show hostnames`` where Slurm's commands are
    installed (Slurm's own reading), else by :func:`expand_hostlist`."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                    timeout=30, check=True)
            hosts = result.stdout.split()
            if hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_hostlist(nodelist)[0]


def port_for_job(job_id: str) -> int:
    """A rendezvous port in 15000–34999 from the job id, so that two jobs sharing a node
    rarely collide (set ``MASTER_PORT`` to choose one)."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 15000 + int(digits) % 20000


def requeue_job() -> str:
    """Requeue the Slurm job this process runs in (``scontrol requeue $SLURM_JOB_ID``), for
    it to start again from its batch script; returns the job id. Raises RuntimeError where
    that is not possible (not in a job, no scontrol, the job was not submitted requeueable)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise RuntimeError("--requeue: this process is not part of a Slurm job (no SLURM_JOB_ID)")
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise RuntimeError("--requeue: Slurm's scontrol is not on PATH")
    result = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed: {result.stderr.strip() or result.returncode} "
                           f"(submit with sbatch --requeue)")
    return job_id
