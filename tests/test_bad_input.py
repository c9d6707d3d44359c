"""Bad flags and settings: one ``error:`` line, a non-zero exit, no traceback, no file touched."""
import hashlib
import json

import pytest
import torch

from fcmae.checkpoint import load_checkpoint
from fcmae.cli import convert, finetune, pretrain

from .helpers import exit_code

PRETRAIN = ["--model", "convnextv2_atto", "--input-size", "64", "--batch-size", "2", "--decoder-dim", "32",
            "--num-workers", "0", "--vis-every", "0", "--epochs", "1", "--steps-per-epoch", "1"]

CASES = [  # (command, arguments, what the error line must say: |-separated parts)
    ("pretrain", ["--lr", "inf"], "--lr|must be a finite number"),
    ("pretrain", ["--blr", "nan"], "--blr|must be a finite number > 0"),
    ("pretrain", ["--warmup-epochs", "nan"], "--warmup-epochs"),
    ("pretrain", ["--clip-grad", "-1"], "--clip-grad|must be a finite number > 0"),
    ("pretrain", ["--clip-grad", "0"], "--clip-grad|must be a finite number > 0"),
    ("pretrain", ["--weight-decay", "-1"], "--weight-decay|must be a finite number >= 0"),
    ("pretrain", ["--steps-per-epoch", "-1"], "--steps-per-epoch|must be a finite whole number >= 1"),
    ("pretrain", ["--epochs", "1.5"], "--epochs|must be a finite whole number"),
    ("pretrain", ["--mask-ratio", "1"], "--mask-ratio"),
    ("pretrain", ["--mask-ratio", "0"], "--mask-ratio"),
    ("pretrain", ["--mask-ratio", "0.9"], "keeps 0 visible"),
    ("pretrain", ["--input-size", "32"], "single 32-px patch"),
    ("pretrain", ["--input-size", "-32"], "--input-size|must be a finite whole number >= 32"),
    ("pretrain", ["--input-size", "100"], "not a multiple of the patch size"),
    ("pretrain", ["--seed", "-3"], "--seed"),
    ("pretrain", ["--init", "missing.pth"], "does not exist"),
    ("pretrain", ["--model", "convnextv2_giant"], "unknown model 'convnextv2_giant'"),
    ("pretrain", ["--backend", "nope"], "unknown sparse backend 'nope'"),
    ("pretrain", ["--data-path", "does/not/exist"], "is not a directory"),
    ("pretrain", ["--dcn-impl", "grid_sample"], "--dcn-impl applies to internimage_* models only"),
    ("pretrain", ["--model", "internimage_t", "--dcn-impl", "triton", "--device", "cpu"],
     "--dcn-impl triton does not run on cpu"),
    ("pretrain", ["--model", "revcol_t", "--grad-checkpointing"], "--grad-checkpointing is not supported by revcol_t"),
    ("pretrain", ["--device", "bogus"], "--device 'bogus' is not a device"),
    *([("pretrain", ["--device", "cuda"], "sees no CUDA GPU")] if not torch.cuda.is_available() else []),
    ("finetune", ["--layer-decay", "0"], "--layer-decay|must be a finite number > 0 and <= 1"),
    ("finetune", ["--drop-path", "1"], "--drop-path|must be a finite number >= 0 and < 1"),
    ("finetune", ["--smoothing", "nan"], "--smoothing"),
    ("finetune", ["--hflip", "1.5"], "--hflip|must be a finite number >= 0 and <= 1"),
    ("finetune", ["--model-ema-decay", "inf"], "--model-ema-decay"),
    ("finetune", ["--eval"], "--eval needs weights"),
    ("finetune", ["--batch-size", "3"], "is odd; mixup/cutmix mix pairs"),
    ("convert", ["--tolerance", "nan"], "--tolerance|must be a finite number >= 0"),
    ("convert", ["--tolerance", "-1"], "--tolerance|must be a finite number >= 0"),
]


def tree_digest(root):
    """Names and contents of every file below ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run(command, arguments, tmp_path):
    out = tmp_path / "out"
    if command == "pretrain":
        argv, entry = PRETRAIN + ["--output-dir", str(out)] + arguments, pretrain.main
    elif command == "finetune":
        argv = ["--data-path", str(tmp_path / "data"), "--output-dir", str(out)] + arguments
        entry = finetune.main
    else:
        argv, entry = [str(tmp_path / "fcmae.pth"), "-o", str(out / "dense.pth")] + arguments, convert.main
    return exit_code(entry, argv)


@pytest.mark.parametrize("command,arguments,message", CASES, ids=[" ".join([c, *a]) for c, a, _ in CASES])
def test_bad_input_is_one_error_line_and_touches_nothing(command, arguments, message, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier run")
    before = tree_digest(tmp_path)
    code = run(command, arguments, tmp_path)
    err = capsys.readouterr().err
    assert code not in (0, None)
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and all(part in error_lines[0] for part in message.split("|")), err
    assert "Traceback" not in err
    assert tree_digest(tmp_path) == before


def strict_json_lines(path):
    def refuse(token):
        raise ValueError(f"invalid JSON token {token}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_blow_up_on_the_last_step_of_an_epoch_keeps_the_last_good_checkpoint(bad, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run("pretrain", ["--epochs", "2"], tmp_path) == 0   # capped: 1 step per epoch
    good = (out / "checkpoint-last.pth").read_bytes()
    assert load_checkpoint(out / "checkpoint-last.pth")["epoch"] == 1
    capsys.readouterr()
    # one more epoch of a single step, whose update leaves a NaN in the weights: no later loss
    # in that epoch can notice, only the check before saving can
    real_step = torch.optim.AdamW.step

    def blow_up(optimizer, *args, **kwargs):
        result = real_step(optimizer, *args, **kwargs)
        optimizer.param_groups[0]["params"][0].data.view(-1)[0] = float(bad)
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", blow_up)
    code = run("pretrain", ["--epochs", "3", "--resume", "auto"], tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and "is not finite after epoch 2" in err and "not saved" in err, err
    assert (out / "checkpoint-last.pth").read_bytes() == good
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    records = strict_json_lines(out / "log.jsonl")
    assert records and all("step" in record for record in records)


def test_non_finite_values_are_written_as_json_null(tmp_path):
    from fcmae.logger import RunLogger
    logger = RunLogger(tmp_path)
    logger.log({"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1}, step=3)
    logger.close()
    assert strict_json_lines(tmp_path / "log.jsonl") == [{"step": 3, "loss": None, "grad_norm": None, "lr": 0.1}]


def test_verify_fails_on_nan_difference(tmp_path, monkeypatch, capsys):
    import fcmae
    import fcmae.cli.convert
    torch.save({"model": fcmae.create_fcmae("convnextv2_atto", decoder_dim=32).state_dict()}, tmp_path / "fcmae.pth")
    monkeypatch.setattr(fcmae.cli.convert, "verify", lambda *args, **kwargs: float("nan"))
    assert run("convert", ["--verify"], tmp_path) == 1
    assert "verification failed" in capsys.readouterr().err
    assert not (tmp_path / "out" / "dense.pth").exists()


@pytest.mark.parametrize("model", ["internimage_t", "revcol_t"])
def test_families_without_a_sparse_path_refuse_another_backend(model):
    from fcmae.models import get_model_entry
    with torch.device("meta"):
        assert get_model_entry(model).build_encoder(backend="torch") is not None
        with pytest.raises(ValueError, match="no sparse encoder .* use --backend torch"):
            get_model_entry(model).build_encoder(backend="minkowski")


@pytest.mark.parametrize("command", ["convert", "knn", "analyze", "finetune --finetune", "pretrain --init",
                                     "visualize"])
def test_non_finite_weights_are_refused_wherever_weights_are_read(command, tmp_path, capsys, monkeypatch):
    """NaN weights are one error line naming the tensor, before any training or output."""
    import fcmae
    from fcmae.cli import analyze, knn, visualize
    monkeypatch.chdir(tmp_path)
    model = fcmae.create_fcmae("convnextv2_atto", decoder_dim=32)
    state = model.state_dict()
    state["encoder.stages.1.0.pwconv1.linear.weight"][0, 0] = float("nan")
    torch.save({"model": state}, tmp_path / "nan.pth")
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    weights, out = str(tmp_path / "nan.pth"), str(tmp_path / "out")
    entry, argv = {
        "convert": (convert.main, [weights, "-o", f"{out}.pth"]),
        "knn": (knn.main, [weights, "--data-path", str(tmp_path / "data")]),
        "analyze": (analyze.main, [weights, "-o", f"{out}.png"]),
        "finetune --finetune": (finetune.main, ["--data-path", str(tmp_path / "data"), "--finetune", weights,
                                                "--output-dir", out]),
        "pretrain --init": (pretrain.main, PRETRAIN + ["--init", weights, "--output-dir", out]),
        "visualize": (visualize.main, [weights, "-o", f"{out}.png"]),
    }[command]
    before = tree_digest(tmp_path)
    assert exit_code(entry, argv) not in (0, None)
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "stages.1.0.pwconv1" in error_lines[0] and "not finite" in error_lines[0]
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("command", ["knn", "analyze"])
def test_a_bad_device_is_refused_before_anything_is_read(command, tmp_path, capsys):
    from fcmae.cli import analyze, knn
    entry, argv = {"knn": (knn.main, ["random:convnextv2_atto", "--data-path", str(tmp_path / "missing")]),
                   "analyze": (analyze.main, ["random:convnextv2_atto", "-o", str(tmp_path / "x.png")])}[command]
    assert exit_code(entry, argv + ["--device", "bogus"]) == 2
    assert "--device 'bogus' is not a device" in capsys.readouterr().err
