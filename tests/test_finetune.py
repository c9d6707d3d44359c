import json
from pathlib import Path

import pytest
import torch

import fcmae
from fcmae.atomic import atomic_save
from fcmae.checkpoint import load_checkpoint
from fcmae.cli.finetune import main
from fcmae.convert import convert_state
from fcmae.optim import layer_decay_param_groups

from .helpers import exit_code, interrupt_at_epoch, randomize_

QUICK = ["--model", "convnextv2_atto", "--input-size", "64", "--batch-size", "4", "--epochs", "2",
         "--num-workers", "0", "--warmup-epochs", "1", "--blr", "1e-2", "--model-ema-decay", "0.9"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An FCMAE checkpoint with random weights and its dense conversion."""
    folder = tmp_path_factory.mktemp("weights")
    model = randomize_(fcmae.create_fcmae("convnextv2_atto", decoder_dim=32), std=0.05)
    atomic_save({"model": model.state_dict()}, folder / "fcmae.pth")
    dense, _ = convert_state(model.state_dict())
    atomic_save({"model": dense}, folder / "dense.pth")
    return folder / "fcmae.pth", folder / "dense.pth", dense


def run_cli(args):
    return exit_code(main, args)


def records(folder):
    return [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]


def test_finetune_from_converted_weights_trains_evaluates_and_saves_ema(labeled_folder, pretrained, tmp_path,
                                                                        capsys):
    _, dense_path, _ = pretrained
    out = tmp_path / "ft"
    assert run_cli(QUICK + ["--data-path", labeled_folder, "--finetune", dense_path, "--output-dir", out]) == 0
    summary = capsys.readouterr().err.splitlines()[-2:]   # what the run ended with, and what to run next
    assert summary[0].startswith("done: top-1 ") and "(best " in summary[0] and str(out) in summary[0], summary
    assert summary[1].startswith("next: fcmae-finetune ") and "--eval --resume" in summary[1]
    checkpoint = load_checkpoint(out / "checkpoint-last.pth")
    assert checkpoint["epoch"] == 1 and "model_ema" in checkpoint
    epochs = [r for r in records(out) if "acc1" in r]
    assert len(epochs) == 2
    assert all(r["acc5"] >= r["acc1"] for r in epochs)
    assert "ema_acc1" in epochs[-1]


def test_evaluate_counts_top1_top5_and_mean_loss_over_batches():
    """Logits stand in for images (the model is the identity): 6 classes, targets ranked 1st,
    2nd, 6th and 1st by their logits → top-1 50 %, top-5 75 %."""
    from fcmae.finetune import evaluate
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [3.0, 2, 1, 0, 0, -1], [0.0, 1, 2, 3, 4, -5], [0.0, 0, 0, 0, 0, 9]])
    targets = torch.tensor([0, 1, 5, 5])
    batches = [(logits[:3], targets[:3]), (logits[3:], targets[3:])]
    metrics = evaluate(torch.nn.Identity(), batches, torch.device("cpu"), "none")
    assert metrics["acc1"] == 50.0 and metrics["acc5"] == 75.0
    assert abs(metrics["val_loss"] - torch.nn.functional.cross_entropy(logits, targets).item()) < 1e-6


def test_linear_probe_leaves_encoder_untouched(labeled_folder, pretrained, tmp_path):
    _, dense_path, dense = pretrained
    out = tmp_path / "lp"
    assert run_cli(QUICK + ["--data-path", labeled_folder, "--finetune", dense_path, "--output-dir", out,
                            "--linear-probe", "--no-model-ema"]) == 0
    trained = load_checkpoint(out / "checkpoint-last.pth")["model"]
    for key, value in dense.items():
        assert torch.equal(trained[key], value), key
    fresh = fcmae.create_model("convnextv2_atto", num_classes=2, head_init_scale=0.001)
    assert not torch.equal(trained["head.weight"], fresh.head.weight)


def test_frozen_encoder_stays_in_eval_mode_and_is_deterministic():
    from fcmae.finetune import freeze_encoder
    model = fcmae.create_model("convnextv2_atto", num_classes=3, drop_path_rate=0.5)
    freeze_encoder(model)
    model.train()
    assert model.head.training and not model.stages.training and not model.stages[0][1].drop_path.training
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.forward_features(images), model.forward_features(images))
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        "norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_a_linear_probe_ema_copy_switches_its_own_modes():
    """timm's EMA deep-copies the probe: the copy's eval() and train() act on the copy (a
    closure would have switched the original instead), and the copy's encoder stays in eval."""
    from timm.utils import ModelEmaV3

    from fcmae.finetune import freeze_encoder
    model = fcmae.create_model("convnextv2_atto", num_classes=3, drop_path_rate=0.5)
    freeze_encoder(model)
    ema = ModelEmaV3(model)
    model.train()
    ema.module.eval()
    assert model.head.training and not model.stages.training
    assert not any(module.training for module in ema.module.modules())
    ema.module.train()
    assert ema.module.head.training and not ema.module.stages.training
    model.eval()
    assert ema.module.head.training


def test_weights_with_a_head_load_it_where_it_fits():
    """A head of the same class count loads; another class count starts fresh, the body loads."""
    from fcmae.checkpoint import load_body
    source = randomize_(fcmae.create_model("convnextv2_atto", num_classes=3)).state_dict()
    same = fcmae.create_model("convnextv2_atto", num_classes=3)
    load_body(same, source, "convnextv2_atto", "source.pth")
    assert torch.equal(same.head.weight, source["head.weight"]) and torch.equal(same.norm.weight, source["norm.weight"])
    other = fcmae.create_model("convnextv2_atto", num_classes=5)
    fresh_head = other.head.weight.clone()
    load_body(other, source, "convnextv2_atto", "source.pth")
    assert torch.equal(other.head.weight, fresh_head)
    assert torch.equal(other.stages[0][0].dwconv.weight, source["stages.0.0.dwconv.weight"])


def test_norms_and_biases_get_no_weight_decay():
    from fcmae.optim import param_groups
    model = fcmae.create_model("convnextv2_atto", num_classes=3)
    decayed, exempt = param_groups(model, 0.05)
    assert decayed["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    decayed_ids = {id(param) for param in decayed["params"]}
    names = dict(model.named_parameters())
    assert all(id(param) not in decayed_ids for name, param in names.items() if param.ndim <= 1), \
        [name for name, param in names.items() if param.ndim <= 1 and id(param) in decayed_ids]
    assert {"downsample_layers.0.0.weight", "head.weight", "stages.0.0.pwconv1.weight"} <= {
        name for name, param in names.items() if id(param) in decayed_ids}


def test_fcmae_checkpoint_converts_on_the_fly(pretrained):
    from fcmae.finetune import load_pretrained
    fcmae_path, _, dense = pretrained
    model = fcmae.create_model("convnextv2_atto", num_classes=3)
    load_pretrained(model, str(fcmae_path), "convnextv2_atto")
    for key, value in dense.items():
        assert torch.equal(model.state_dict()[key], value)


def test_wrong_model_weights_are_refused(labeled_folder, pretrained, tmp_path, capsys):
    _, dense_path, _ = pretrained
    code = run_cli(QUICK + ["--model", "convnextv2_femto", "--data-path", labeled_folder,
                            "--finetune", dense_path, "--output-dir", tmp_path])
    assert code == 2 and "'convnextv2_femto'" in capsys.readouterr().err


def test_pretraining_checkpoint_as_resume_says_to_use_finetune(labeled_folder, pretrained, tmp_path, capsys):
    fcmae_path, _, _ = pretrained
    code = run_cli(QUICK + ["--data-path", labeled_folder, "--resume", fcmae_path, "--output-dir", tmp_path / "o"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(err) == 1 and "pass it as --finetune" in err[0], err


def test_unreadable_training_images_are_skipped_and_counted(labeled_folder, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(labeled_folder, data)
    (data / "train" / "class0" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipping unreadable image .*truncated.jpg"):
        assert run_cli(QUICK + ["--data-path", data, "--output-dir", out, "--epochs", "1",
                                "--no-model-ema", "--batch-size", "13", "--mixup", "0", "--cutmix", "0"]) == 0
    assert records(out)[-1]["skipped_image_reads"] >= 1


def test_eval_only_reports_accuracy(labeled_folder, pretrained, tmp_path, capsys):
    _, dense_path, _ = pretrained
    assert run_cli(QUICK + ["--data-path", labeled_folder, "--finetune", dense_path, "--eval",
                            "--output-dir", tmp_path]) == 0
    assert "eval: top-1" in capsys.readouterr().err


def test_missing_val_split_is_one_line_error(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    assert run_cli(QUICK + ["--data-path", tmp_path, "--output-dir", tmp_path / "out"]) == 2
    assert "error:" in capsys.readouterr().err


def test_layer_decay_groups_follow_official_ids():
    with torch.device("meta"):
        model = fcmae.create_model("convnextv2_base")
    assert model.num_layers("group") == 12
    ids = {name: model.layer_id(name, "group") for name, _ in model.named_parameters()}
    assert ids["downsample_layers.0.0.weight"] == 0
    assert ids["stages.0.2.dwconv.weight"] == 1 and ids["downsample_layers.1.1.weight"] == 2
    assert ids["stages.2.0.pwconv1.weight"] == 3 and ids["stages.2.26.pwconv1.weight"] == 11
    assert ids["downsample_layers.3.1.weight"] == 12 and ids["head.weight"] == 13
    single = {name: model.layer_id(name, "single") for name, _ in model.named_parameters()}
    assert single["downsample_layers.0.0.weight"] == 1 and single["stages.1.0.norm.weight"] == 4
    assert single["head.bias"] == sum(model.depths) + 1
    groups = layer_decay_param_groups(model, 0.05, 0.5, "group")
    scales = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert scales[id(params["head.weight"])] == 1.0
    assert scales[id(params["downsample_layers.0.0.weight"])] == 0.5 ** 13
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(params["stages.0.0.grn.gamma"])] == 0.0 and decay[id(params["head.weight"])] == 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("revcol_t", []), ("internimage_t", ["--grad-checkpointing"]),
                                        ("convnext_atto", ["--grad-checkpointing"])])
def test_other_encoder_families_fine_tune_from_fcmae_weights(name, extra, labeled_folder, tmp_path):
    model = fcmae.create_fcmae(name, decoder_dim=32)
    dense, found = convert_state(model.state_dict())
    assert found == name
    atomic_save({"model": dense}, tmp_path / "dense.pth")
    out = tmp_path / "ft"
    assert run_cli(QUICK + ["--model", name, "--data-path", labeled_folder, "--finetune", tmp_path / "dense.pth",
                            "--output-dir", out, "--epochs", "1", "--steps-per-epoch", "1",
                            "--layer-decay", "0.8"] + extra) == 0
    trained = load_checkpoint(out / "checkpoint-last.pth")["model"]
    assert set(dense) < set(trained)
    # one small step from the pretrained weights, not from a fresh init
    assert all(torch.allclose(trained[key], value, atol=1e-2) for key, value in dense.items())


@pytest.mark.slow
def test_two_epochs_equal_one_plus_one_with_resume(labeled_folder, pretrained, tmp_path, monkeypatch):
    """Evaluation between epochs must not shift the random streams: model and EMA bit for bit."""
    _, dense_path, _ = pretrained
    common = QUICK + ["--data-path", labeled_folder, "--finetune", dense_path, "--seed", "5",
                      "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(common + ["--output-dir", straight]) == 0
    with monkeypatch.context() as patch:
        interrupt_at_epoch(patch, 1)
        assert run_cli(common + ["--output-dir", split]) == 130
    assert load_checkpoint(split / "checkpoint-last.pth")["epoch"] == 0
    assert run_cli(common + ["--output-dir", split, "--resume", "auto"]) == 0
    a, b = load_checkpoint(straight / "checkpoint-last.pth"), load_checkpoint(split / "checkpoint-last.pth")
    assert a["epoch"] == b["epoch"] == 1
    for part in ("model", "model_ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"


def test_default_randaugment_runs_on_every_pillow(labeled_folder, tmp_path):
    """RandAugment's increasing posterize keeps 0 bits at magnitude 10, which Pillow 13 refuses:
    the fine-tuning transform must apply every op at every magnitude without an error."""
    from PIL import Image

    from fcmae.cli.finetune import build_parser
    from fcmae.finetune import build_datasets
    args = build_parser().parse_args(QUICK + ["--data-path", str(labeled_folder), "--aa", "rand-m10-mstd0-inc1"])
    train, _ = build_datasets(args, tmp_path)
    image = Image.open(next((labeled_folder / "train" / "class0").iterdir())).convert("RGB")
    for _ in range(200):   # two of ~15 ops per call: posterize is drawn ~25 times
        assert train.transform(image).shape == (3, 64, 64)


def test_eval_of_a_checkpoint_needs_no_training_flags_and_writes_nothing(labeled_folder, pretrained, tmp_path,
                                                                         capsys):
    """--eval --resume reads only the weights: another --layer-decay (a different optimizer
    layout) does not matter, and the output folder is left exactly as it was."""
    _, dense_path, _ = pretrained
    out = tmp_path / "ft"
    assert run_cli(QUICK + ["--data-path", labeled_folder, "--finetune", dense_path, "--output-dir", out,
                            "--epochs", "1", "--layer-decay", "0.9", "--layer-decay-type", "single"]) == 0
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert run_cli(QUICK + ["--data-path", labeled_folder, "--eval", "--resume", out / "checkpoint-last.pth",
                            "--output-dir", out]) == 0
    assert "eval: top-1" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_revcol_fine_tunes_with_intermediate_supervision(labeled_folder, tmp_path, monkeypatch, capsys):
    """--inter-supervision on builds the heads and decoders and trains with RevCol's loss
    (through the family's supervised_loss); pretraining does not offer the flag."""
    from fcmae.models import revcol
    calls = []
    real = revcol.inter_supervision_loss

    def counted(*args, **kwargs):
        calls.append(len(args[0]))   # heads
        return real(*args, **kwargs)
    monkeypatch.setattr(revcol, "inter_supervision_loss", counted)
    argv = QUICK + ["--model", "revcol_t", "--data-path", labeled_folder, "--output-dir", tmp_path / "ft",
                    "--epochs", "1", "--steps-per-epoch", "1", "--inter-supervision", "on", "--no-model-ema"]
    assert run_cli(argv) == 0
    assert calls == [4]
    trained = load_checkpoint(tmp_path / "ft" / "checkpoint-last.pth")["model"]
    assert "decoder_blocks.2.projback.0.weight" in trained and "cls_blocks.3.classifier.1.weight" in trained
    from fcmae.cli import pretrain
    assert exit_code(pretrain.main, ["--model", "revcol_t", "--inter-supervision", "on"]) == 2
    assert "unrecognized arguments: --inter-supervision" in capsys.readouterr().err
