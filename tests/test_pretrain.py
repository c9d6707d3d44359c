import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fcmae.checkpoint import load_checkpoint
from fcmae.cli.pretrain import build_parser, main
from fcmae.data import DEMO_TRAIN_PHOTOS, demo_photo_paths
from fcmae.pretrain import run_pretraining

from .helpers import exit_code, free_port, interrupt_at_epoch

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--model", "convnextv2_atto", "--input-size", "64", "--batch-size", "2", "--decoder-dim", "32",
         "--num-workers", "0", "--blr", "0.1", "--warmup-epochs", "1", "--vis-every", "1"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An ImageFolder tree of real photo crops, plus one corrupt file and one grayscale image."""
    root = tmp_path_factory.mktemp("images")
    for index, path in enumerate(demo_photo_paths(DEMO_TRAIN_PHOTOS[:6])):
        folder = root / f"class{index % 2}"
        folder.mkdir(exist_ok=True)
        with Image.open(path) as photo:
            photo.convert("RGB").resize((96, 80)).save(folder / f"{path.stem}.png")
    with Image.open(demo_photo_paths(["camera.png"])[0]) as gray:
        gray.convert("L").resize((72, 72)).save(root / "class0" / "gray.jpg")
    (root / "class1" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return root


def run_cli(args):
    return exit_code(main, args)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_end_to_end_on_folder_with_corrupt_and_gray_images(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipping unreadable image .*corrupt.jpg"):
        code = run_cli(QUICK + ["--data-path", str(image_folder), "--output-dir", str(out), "--epochs", "2"])
    assert code == 0
    checkpoint = load_checkpoint(out / "checkpoint-last.pth")
    assert checkpoint["epoch"] == 1 and checkpoint["model_name"] == "convnextv2_atto"
    assert "encoder.stages.0.0.dwconv.kernel" in checkpoint["model"]
    assert list(out.glob("events.out.tfevents.*"))
    records = read_jsonl(out / "log.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    epochs = [r for r in records if "epoch_loss" in r]
    assert epochs[-1]["skipped_image_reads"] >= 1
    err = capsys.readouterr().err
    assert "next: fcmae-convert" in err and "skipped_image_reads" in err


def test_save_every_names_files_by_epochs_completed_and_the_schedule_starts_above_zero(image_folder, tmp_path):
    out = tmp_path / "out"
    assert run_cli(QUICK + ["--data-path", str(image_folder), "--output-dir", str(out), "--epochs", "2",
                            "--save-every", "1", "--steps-per-epoch", "2", "--min-lr", "0.001"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-1.pth", "checkpoint-2.pth",
                                                                     "checkpoint-last.pth"]
    assert load_checkpoint(out / "checkpoint-1.pth")["epoch"] == 0          # holds 1 epoch
    assert os.path.samefile(out / "checkpoint-2.pth", out / "checkpoint-last.pth")   # a link, not a copy
    lrs = [r["lr"] for r in read_jsonl(out / "log.jsonl") if "lr" in r]
    base = 0.1 * 2 / 256                                                     # blr * batch / 256
    assert lrs[0] == pytest.approx(base / 2) and lrs[1] == pytest.approx(base)   # warm-up of 1 epoch = 2 steps
    assert lrs[-1] == pytest.approx(0.001)                                  # the last step reaches --min-lr


def test_threads_flag_sets_the_cpu_threads(monkeypatch):
    from fcmae.run import setup_run
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    setup_run(build_parser().parse_args(["--threads", "3", "--device", "cpu"]))
    assert calls == [3]


def test_loss_decreases_on_a_fixed_batch():
    from fcmae import create_fcmae
    from fcmae.engine import TrainingConfig, train_one_epoch
    from fcmae.logger import RunLogger
    from fcmae.masking import random_masks
    from fcmae.optim import param_groups
    from fcmae.run import make_scaler

    model = create_fcmae("convnextv2_atto", decoder_dim=32)
    imgs = torch.randn(4, 3, 64, 64)
    mask = random_masks(4, 4, 0.5)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=3e-3, betas=(0.9, 0.95))
    config = TrainingConfig(lr=3e-3, min_lr=3e-3, warmup_epochs=0, epochs=1)
    losses = []

    def fixed_mask_loss(net, batch):
        loss, pred, _ = net(batch, mask=mask)
        losses.append(loss.item())
        return loss, pred

    train_one_epoch(model, [imgs] * 20, optimizer, make_scaler("none", torch.device("cpu")),
                    fixed_mask_loss, config, 0, 0, torch.device("cpu"), RunLogger(None))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_two_epochs_equal_one_plus_one_with_resume(image_folder, tmp_path, monkeypatch):
    common = QUICK + ["--data-path", str(image_folder), "--seed", "3", "--epochs", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(common + ["--output-dir", str(straight)]) == 0
    with monkeypatch.context() as patch:
        interrupt_at_epoch(patch, 1)
        assert run_cli(common + ["--output-dir", str(split)]) == 130
    assert load_checkpoint(split / "checkpoint-last.pth")["epoch"] == 0
    assert run_cli(common + ["--output-dir", str(split), "--resume", "auto"]) == 0

    straight_losses = [r["loss"] for r in read_jsonl(straight / "log.jsonl") if "loss" in r]
    split_losses = [r["loss"] for r in read_jsonl(split / "log.jsonl") if "loss" in r]
    assert split_losses == straight_losses
    a = load_checkpoint(straight / "checkpoint-last.pth")
    b = load_checkpoint(split / "checkpoint-last.pth")
    assert a["step"] == b["step"] == 8
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.slow
def test_two_process_gloo_run_ends_with_identical_weights(image_folder, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(REPO / "tests" / "ddp_worker.py"),
               *QUICK, "--data-path", str(image_folder), "--output-dir", str(out), "--epochs", "1",
               "--dist-backend", "gloo", "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    saved = load_checkpoint(out / "checkpoint-last.pth")["model"]
    initial_differs = False
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], saved[key]), key
        initial_differs |= not torch.equal(rank0[key], torch.zeros_like(rank0[key]))
    assert initial_differs
    records = read_jsonl(out / "log.jsonl")   # rank 0 only: 8 images / (2 per process x 2) = 2 steps
    assert len([r for r in records if "loss" in r]) == 2


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(image_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    common = QUICK + ["--data-path", str(image_folder), "--output-dir", str(out), "--epochs", "2"]
    with monkeypatch.context() as patch:
        interrupt_at_epoch(patch, 1)
        run_cli(common)
    good = (out / "checkpoint-last.pth").read_bytes()
    import fcmae.pretrain

    def nan_loss(model, imgs):
        loss, outputs = real_loss(model, imgs)
        return loss * float("nan"), outputs
    real_loss = fcmae.pretrain._fcmae_loss
    monkeypatch.setattr(fcmae.pretrain, "_fcmae_loss", nan_loss)
    assert run_cli(common + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss is nan at epoch 1, step 5" in err and err.startswith("fcmae-pretrain: error:")
    assert (out / "checkpoint-last.pth").read_bytes() == good
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_grad_checkpointing_trains_the_same_weights(image_folder, tmp_path):
    weights = {}
    for flag in ([], ["--grad-checkpointing"]):
        args = build_parser().parse_args(QUICK + ["--data-path", str(image_folder), "--epochs", "1",
                                                  "--steps-per-epoch", "2", "--output-dir",
                                                  str(tmp_path / ("ckpt" if flag else "plain"))] + flag)
        last, model = run_pretraining(args)
        assert model.encoder.stages[0].grad_checkpointing == bool(flag)
        weights[bool(flag)] = load_checkpoint(last)["model"]
    for name, value in weights[True].items():
        torch.testing.assert_close(value, weights[False][name], rtol=1e-5, atol=1e-6, msg=name)


def test_empty_folder_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert run_cli(QUICK + ["--data-path", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "no images" in capsys.readouterr().err


def test_resume_refuses_checkpoint_of_another_model(image_folder, tmp_path, capsys):
    out = tmp_path / "atto"
    assert run_cli(QUICK + ["--data-path", str(image_folder), "--output-dir", str(out),
                            "--epochs", "1", "--steps-per-epoch", "1"]) == 0
    code = run_cli(QUICK + ["--model", "convnextv2_femto", "--data-path", str(image_folder),
                            "--output-dir", str(tmp_path / "femto"),
                            "--resume", str(out / "checkpoint-last.pth")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "'convnextv2_atto'" in err and "'convnextv2_femto'" in err


def test_corrupt_checkpoint_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage" * 10)
    assert run_cli(QUICK + ["--resume", str(bad), "--output-dir", str(tmp_path)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_official_underscore_aliases_parse():
    args = build_parser().parse_args(["--mask_ratio", "0.75", "--data_path", "x", "--batch_size", "8"])
    assert (args.mask_ratio, args.data_path, args.batch_size) == (0.75, "x", 8)


def interrupt_after_step(monkeypatch, stop_step):
    """Ctrl-C right after global step ``stop_step`` was logged (mid-epoch)."""
    import fcmae.logger
    real = fcmae.logger.RunLogger.log

    def log(self, record, step, prefix="train"):
        real(self, record, step, prefix)
        if prefix == "train" and step == stop_step:
            raise KeyboardInterrupt
    monkeypatch.setattr(fcmae.logger.RunLogger, "log", log)


def test_a_folder_holding_a_run_is_continued_or_replaced_never_appended_to(image_folder, tmp_path, monkeypatch,
                                                                           capsys):
    """Ctrl-C before the first checkpoint says there is nothing to resume; a fresh run into a
    folder holding one is refused; --resume auto (nothing to resume) and --overwrite start over
    without logging any step twice."""
    common = QUICK + ["--data-path", str(image_folder), "--epochs", "1", "--output-dir", str(tmp_path)]
    with monkeypatch.context() as patch:
        interrupt_after_step(patch, 2)
        assert run_cli(common) == 130
    assert "before the first checkpoint: nothing to resume" in capsys.readouterr().err
    assert run_cli(common) == 2
    assert "already holds a run (log.jsonl); continue it with --resume auto" in capsys.readouterr().err
    for again in (["--resume", "auto"], ["--overwrite"]):
        assert run_cli(common + again) == 0
        steps = [record["step"] for record in read_jsonl(tmp_path / "log.jsonl") if "loss" in record]
        assert steps == sorted(set(steps)) and len(steps) == 4, (again, steps)
    with monkeypatch.context() as patch:
        interrupt_after_step(patch, 5)
        assert run_cli(QUICK + ["--data-path", str(image_folder), "--epochs", "2", "--output-dir", str(tmp_path),
                                "--resume", "auto"]) == 130
    assert f"--resume auto continues from {tmp_path / 'checkpoint-last.pth'}" in capsys.readouterr().err


def test_short_runs_warm_up_in_proportion_and_too_long_a_warmup_is_named(caplog):
    """Unset --warmup-epochs is the recipe's share of --epochs (official: 40 of 800 = 5 %), so
    --epochs 2 warms up over 0.1 epochs instead of never reaching the peak lr; a warm-up as
    long as the run is warned about."""
    import argparse

    from fcmae.pretrain import resolve_recipe
    args = resolve_recipe(argparse.Namespace(data_path="DATA", epochs=2, batch_size=None, blr=None,
                                             warmup_epochs=None))
    assert args.warmup_epochs == pytest.approx(0.1) and args.batch_size == 64
    assert resolve_recipe(argparse.Namespace(data_path="DATA", epochs=None, batch_size=None, blr=None,
                                             warmup_epochs=None)).warmup_epochs == 40
    import logging
    package_logger = logging.getLogger("fcmae")   # the CLIs stop it propagating: listen on it directly
    package_logger.addHandler(caplog.handler)
    try:
        resolve_recipe(argparse.Namespace(data_path=None, epochs=2, batch_size=None, blr=None, warmup_epochs=5))
    finally:
        package_logger.removeHandler(caplog.handler)
    assert "--warmup-epochs 5 >= --epochs 2" in caplog.text


def test_resume_names_changed_settings_and_refuses_those_that_break_exactness(image_folder, tmp_path, capsys):
    common = QUICK + ["--data-path", str(image_folder), "--output-dir", str(tmp_path), "--resume", "auto"]
    assert run_cli(common + ["--epochs", "1"]) == 0
    capsys.readouterr()
    assert run_cli(common + ["--epochs", "2", "--batch-size", "4", "--blr", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 2 → 4" in err and "--blr 0.1 → 0.2" in err and "--allow-changed-settings" in err, err
    assert load_checkpoint(tmp_path / "checkpoint-last.pth")["epoch"] == 0          # untouched
    assert run_cli(common + ["--epochs", "2", "--blr", "0.2"]) == 0                 # listed, not refused
    assert "differ from the checkpoint's: --blr 0.1 → 0.2" in capsys.readouterr().err
    assert run_cli(common + ["--epochs", "3", "--input-size", "96", "--allow-changed-settings"]) == 0
    assert "--input-size 64 → 96" in capsys.readouterr().err


def test_a_second_run_into_a_busy_folder_is_refused_and_a_stale_lock_taken_over(image_folder, tmp_path, capsys):
    """The lock holds pid and host: a live holder refuses the second run; one whose process is
    gone (a crash) is taken over; the lock is gone once the run ends."""
    import socket
    lock = tmp_path / ".fcmae-run.lock"
    common = QUICK + ["--data-path", str(image_folder), "--epochs", "1", "--output-dir", str(tmp_path)]
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))   # alive: this process
    assert run_cli(common) == 2
    assert f"is in use by another run (process {os.getpid()}" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint-last.pth").exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    assert run_cli(common) == 0
    assert "taking over" in capsys.readouterr().err
    assert (tmp_path / "checkpoint-last.pth").is_file() and not lock.exists()


def test_a_symlinked_run_log_is_refused_and_its_target_untouched(image_folder, tmp_path, capsys):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "log.jsonl").symlink_to(target)
    assert run_cli(QUICK + ["--data-path", str(image_folder), "--epochs", "1", "--output-dir", str(tmp_path / "out"),
                            "--resume", "auto"]) == 2
    assert "is a symbolic link" in capsys.readouterr().err and target.read_text() == "precious\n"
