"""Slurm: launch under srun, preemption by signal with a mid-epoch checkpoint that resumes bit
for bit, requeue — with environment tests here and a real one-node Slurm (slow tests)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae import distributed, preemption, slurm
from fcmae.checkpoint import load_checkpoint
from fcmae.cli import finetune, pretrain
from fcmae.cli import shards as shards_cli

from .helpers import exit_code, free_port

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = ["--model", "convnextv2_atto", "--input-size", "64", "--batch-size", "2", "--decoder-dim", "32",
            "--vis-every", "0", "--blr", "0.1", "--warmup-epochs", "1", "--seed", "3"]


@pytest.mark.parametrize("nodelist,hosts", [
    ("gpu01", ["gpu01"]),
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("a[8-10],b1", ["a8", "a9", "a10", "b1"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("n[009-011]", ["n009", "n010", "n011"]),
    ("x-1,y[3,5]", ["x-1", "y3", "y5"]),
])
def test_compressed_node_lists_expand_as_slurm_does(nodelist, hosts):
    assert slurm.expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[01-04", "gpu01]", "gpu[4-2]", "gpu[a-b]"])
def test_malformed_node_lists_are_refused(nodelist):
    with pytest.raises(ValueError, match="malformed Slurm node list"):
        slurm.expand_hostlist(nodelist)


def test_the_first_host_without_slurm_commands_comes_from_the_parser(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    assert slurm.first_host("gpu[07-09]") == "gpu07"


SRUN_TASK = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
             "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_JOB_NODELIST": "gpu[01-02]"}


def test_an_srun_task_finds_its_rank_and_rendezvous(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    launch = distributed.describe_launch(SRUN_TASK)
    assert launch == distributed.Launch(3, 4, 1, "srun", "gpu01", slurm.port_for_job("4242"))
    assert 15000 <= launch.master_port < 35000
    chosen = distributed.describe_launch({**SRUN_TASK, "MASTER_PORT": "29999", "MASTER_ADDR": "head"})
    assert (chosen.master_addr, chosen.master_port) == ("head", 29999)


def test_torchrun_wins_inside_an_allocation_and_a_batch_script_is_one_process():
    torchrun = {**SRUN_TASK, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5"}
    assert distributed.describe_launch(torchrun) == distributed.Launch(5, 8, 5, "torchrun")
    batch_step = {key: value for key, value in SRUN_TASK.items() if key != "SLURM_STEP_NUM_TASKS"}
    batch_step["SLURM_PROCID"] = "0"
    assert distributed.describe_launch(batch_step) == distributed.Launch(0, 1, 0, "none")


def test_requeue_outside_a_job_is_refused(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RuntimeError, match="not part of a Slurm job"):
        slurm.requeue_job()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(16):
        folder = root / f"class{index % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def shard_spec(image_folder, tmp_path_factory):
    destination = tmp_path_factory.mktemp("shards")
    assert exit_code(shards_cli.main, [image_folder, destination, "--max-count", "2"]) == 0
    return f"{destination}/shard-{{000000..000007}}.tar"


def signal_after_optimizer_steps(monkeypatch, count):
    """Send this process SIGUSR1 during optimizer step ``count`` (1-based), as Slurm would."""
    real_step, calls = torch.optim.AdamW.step, []

    def step(optimizer, *args, **kwargs):
        calls.append(1)
        if len(calls) == count:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(optimizer, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def assert_same_run(a_dir, b_dir):
    a, b = load_checkpoint(a_dir / "checkpoint-last.pth"), load_checkpoint(b_dir / "checkpoint-last.pth")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) and "batch" not in b
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][index]["exp_avg"]), index
    a_log, b_log = (read_jsonl(folder / "log.jsonl") for folder in (a_dir, b_dir))
    assert b_log == a_log    # every step once, the same losses; the epoch records equal


def read_jsonl(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record.pop("img_per_s", None)
    return records


@pytest.mark.parametrize("source,workers", [("folder", 0), ("shards", 2)])
def test_a_preempted_run_checkpoints_mid_epoch_and_resumes_bit_for_bit(source, workers, image_folder, shard_spec,
                                                                       tmp_path, monkeypatch, capsys):
    """Stopped after 3 of 4 steps (an odd batch count: with 2 shard workers the resumed loader
    must start at the second worker's batch), then resumed: the same weights, optimizer state
    and log as an uninterrupted run."""
    data = str(image_folder) if source == "folder" else shard_spec
    common = PRETRAIN + ["--data-path", data, "--num-workers", str(workers), "--epochs", "2",
                         "--steps-per-epoch", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert exit_code(pretrain.main, common + ["--output-dir", straight]) == 0
    with monkeypatch.context() as patch:
        signal_after_optimizer_steps(patch, 2)   # noticed at step 3's loss reduction: stops after step 3
        assert exit_code(pretrain.main, common + ["--output-dir", split]) == pretrain_exit_preempted()
    err = capsys.readouterr().err
    assert "SIGUSR1 received at" in err and "stopped after step 3 (epoch 0)" in err, err
    saved = load_checkpoint(split / "checkpoint-last.pth")
    assert (saved["epoch"], saved["step"], saved["batch"], len(saved["epoch_losses"])) == (-1, 3, 3, 3)
    assert exit_code(pretrain.main, common + ["--output-dir", split, "--resume", "auto"]) == 0
    assert "epoch 0, batch 3 of it (a mid-epoch checkpoint)" in capsys.readouterr().err
    assert_same_run(straight, split)


def pretrain_exit_preempted():
    from fcmae.cli import PREEMPTED_EXIT
    return PREEMPTED_EXIT


def test_a_preemption_at_an_epoch_end_stops_there_without_monitors(image_folder, tmp_path, monkeypatch, capsys):
    common = PRETRAIN + ["--data-path", str(image_folder), "--num-workers", "0", "--epochs", "2",
                         "--steps-per-epoch", "2", "--output-dir", tmp_path]
    from fcmae import monitor
    monkeypatch.setattr(monitor.ReconstructionMonitor, "__call__", lambda *a: pytest.fail("monitor ran"))
    signal_after_optimizer_steps(monkeypatch, 1)
    assert exit_code(pretrain.main, common + ["--val-data-path", image_folder]) == pretrain_exit_preempted()
    saved = load_checkpoint(tmp_path / "checkpoint-last.pth")
    assert (saved["epoch"], saved["step"]) == (0, 2) and "batch" not in saved
    assert "stopped after step 2 (epoch 1)" in capsys.readouterr().err


def test_fine_tuning_stops_on_the_signal_too_and_requeue_outside_slurm_says_why(image_folder, tmp_path, monkeypatch,
                                                                                  capsys):
    for split in ("train", "val"):
        shutil.copytree(image_folder, tmp_path / "data" / split)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    signal_after_optimizer_steps(monkeypatch, 1)
    argv = ["--data-path", tmp_path / "data", "--model", "convnextv2_atto", "--input-size", "64", "--batch-size", "2",
            "--num-workers", "0", "--epochs", "1", "--steps-per-epoch", "4", "--mixup", "0", "--cutmix", "0",
            "--model-ema", "--output-dir", tmp_path / "out", "--requeue"]
    assert exit_code(finetune.main, argv) == pretrain_exit_preempted()
    err = capsys.readouterr().err
    assert "not requeued: --requeue: this process is not part of a Slurm job" in err, err
    saved = load_checkpoint(tmp_path / "out" / "checkpoint-last.pth")
    assert (saved["epoch"], saved["batch"]) == (-1, 2) and "model_ema" in saved


def test_preempt_signal_none_leaves_the_signal_alone():
    with preemption.handling("none"):
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    with preemption.handling("USR2"):
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)
        assert preemption.requested() == "USR2"
    assert preemption.requested() is None and signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL


# --- a real one-node Slurm (tools/slurm/local_cluster.sh), the example sbatch script -----------

SBATCH_EXAMPLE = REPO / "tools" / "slurm" / "pretrain.sbatch"
# the example's flags for a 2-task CPU run on the local node (the command line wins over #SBATCH)
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0", "--time=20"]
RUN = ["--model", "convnextv2_atto", "--input-size", "64", "--batch-size", "2", "--decoder-dim", "32",
       "--vis-every", "0", "--blr", "0.1", "--epochs", "2", "--warmup-epochs", "1", "--seed", "3",
       "--amp", "none", "--num-workers", "0", "--threads", "1", "--dist-backend", "gloo", "--device", "cpu"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node Slurm; its environment for the client commands and jobs."""
    skip = pytest.fail if os.environ.get("FCMAE_REQUIRE_SLURM") == "1" else pytest.skip   # CI: never skipped
    if not (shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()):
        skip("Slurm is not installed here (apt-get install slurm-wlm munge; .ci/run installs it)")
    if os.geteuid() != 0:
        skip("the local cluster's daemons run as root (SlurmUser=root); run the tests as root")
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}:/usr/sbin", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    started = subprocess.run(["bash", REPO / "tools" / "slurm" / "local_cluster.sh", "start", folder], env=env,
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr + (folder / "log" / "slurmctld.log").read_text()[-2000:]
    env["SLURM_CONF"] = str(folder / "slurm.conf")
    yield env
    subprocess.run(["bash", REPO / "tools" / "slurm" / "local_cluster.sh", "stop", folder], timeout=60)


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """64 images: 16 steps per epoch for 2 tasks of batch 2, time enough to signal mid-epoch."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(1)
    for index in range(64):
        Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(root / f"{index:02d}.png")
    return root


@pytest.fixture(scope="module")
def torchrun_reference(many_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), "-m", "fcmae.cli.pretrain", *RUN,
                             "--data-path", str(many_images), "--output-dir", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def submit(env, folder, data, *options):
    result = subprocess.run(["sbatch", "--parsable", *CPU_JOB, f"--output={folder}/job-%j.out", *options,
                             SBATCH_EXAMPLE, *RUN, "--log-level", "info"],
                            env={**env, "DATA": str(data), "OUTPUT": str(folder / "run")},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_state(env, job):
    fields = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True,
                            timeout=30).stdout.split()
    return dict(field.split("=", 1) for field in fields if "=" in field)


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def assert_same_weights(a_dir, b_dir):
    a, b = load_checkpoint(a_dir / "checkpoint-last.pth"), load_checkpoint(b_dir / "checkpoint-last.pth")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.slow
def test_an_srun_job_trains_what_torchrun_trains(cluster, many_images, torchrun_reference, tmp_path):
    job = submit(cluster, tmp_path, many_images, "--wait")
    log = (tmp_path / f"job-{job}.out").read_text()
    assert job_state(cluster, job)["JobState"] == "COMPLETED", log[-3000:]
    assert "2 process(es) on cpu" in log, log[-3000:]
    assert_same_weights(torchrun_reference, tmp_path / "run")


@pytest.mark.slow
def test_a_signalled_job_checkpoints_mid_epoch_requeues_and_finishes_the_same(cluster, many_images,
                                                                             torchrun_reference, tmp_path):
    job = submit(cluster, tmp_path, many_images)
    log_file = tmp_path / "run" / "log.jsonl"

    def trained_two_steps():
        return log_file.is_file() and sum(1 for line in log_file.read_text().splitlines() if '"loss"' in line) >= 2
    wait_for(trained_two_steps, 300, "the job's second step")
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster, check=True, timeout=30)   # every task
    wait_for(lambda: job_state(cluster, job).get("Restarts") == "1", 120, "the requeue")
    # Slurm holds a requeued job for 120 s before it may start again; let it start now
    subprocess.run(["scontrol", "update", f"JobId={job}", "BeginTime=now"], env=cluster, timeout=30)
    wait_for(lambda: job_state(cluster, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 400,
             "the requeued job to finish")
    log = (tmp_path / f"job-{job}.out").read_text()
    assert job_state(cluster, job)["JobState"] == "COMPLETED", log[-4000:]
    assert "SIGUSR1 received at" in log and "(epoch 0), checkpoint" in log, log[-4000:]
    assert "requeued Slurm job" in log and "restarted 1 time(s)" in log, log[-4000:]
    assert "batch" in log and "(a mid-epoch checkpoint)" in log, log[-4000:]
    assert_same_weights(torchrun_reference, tmp_path / "run")
