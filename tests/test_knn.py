"""k-NN evaluation, fcmae-knn, and the pretraining monitors (--knn-data-path, --val-data-path)."""
import json

import pytest
import torch
import torch.nn.functional as F

import fcmae
from fcmae.cli.knn import main as knn_main
from fcmae.cli.pretrain import main as pretrain_main
from fcmae.knn import knn_accuracy, knn_evaluate, knn_splits, spread_subset
from fcmae.weights import extract_features, load_encoder, load_fcmae

from .helpers import exit_code


def test_knn_votes_by_weighted_neighbours():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1])
    val = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 0.3]]), dim=1)
    # k=5: for the class-0 points the two class-0 neighbours are much closer than class 1's three
    assert knn_accuracy(train, labels, val, torch.tensor([0, 1, 0]), k=5) == 100.0
    # with a huge temperature the vote is a plain majority: class 1 (three of five) wins everywhere
    assert knn_accuracy(train, labels, val, torch.tensor([0, 1, 0]), k=5, temperature=1e6) == pytest.approx(100 / 3)


def test_spread_subset_keeps_every_class(labeled_folder):
    train, val, classes = knn_splits(labeled_folder, 64, max_images=4)
    assert len(train) == 4 and len(val) == 4 and classes == ["class0", "class1"]
    assert sorted(label for _, label in train) == [0, 0, 1, 1]
    assert spread_subset(val, None) is val


def test_fcmae_knn_cli_reports_the_same_number_as_the_library(labeled_folder, tmp_path, capsys):
    torch.manual_seed(0)
    model = fcmae.create_fcmae("convnextv2_atto", decoder_dim=16)
    torch.save({"model": model.state_dict()}, tmp_path / "fcmae.pth")
    assert exit_code(knn_main, [tmp_path / "fcmae.pth", "--data-path", labeled_folder, "--input-size", 64,
                                "--k", 3, "--num-workers", 0]) == 0
    line = [line for line in capsys.readouterr().err.splitlines() if "k-NN" in line][0]
    encoder, _ = load_encoder(tmp_path / "fcmae.pth")
    train, val, _ = knn_splits(labeled_folder, 64)
    expected = knn_evaluate(lambda images: extract_features(encoder, images), train, val, k=3)
    assert f"top-1 {expected:.2f}%" in line and "on 8 val images, 12 train images" in line


def test_pretraining_logs_knn_and_held_out_loss_when_due(labeled_folder, tmp_path):
    out = tmp_path / "run"
    assert exit_code(pretrain_main, [
        "--model", "convnextv2_atto", "--input-size", "64", "--batch-size", "4", "--decoder-dim", "16",
        "--num-workers", "0", "--epochs", "3", "--steps-per-epoch", "1", "--data-path", labeled_folder / "train",
        "--knn-data-path", labeled_folder, "--knn-k", "3", "--val-data-path", labeled_folder / "val",
        "--monitor-every", "2", "--output-dir", out, "--vis-every", "0"]) == 0
    epochs = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "epoch_loss" in r]
    assert [("knn_top1" in r, "val_loss" in r) for r in epochs] == [(False, False), (True, True), (True, True)]
    # the held-out loss uses fixed masks: recomputing it from the final checkpoint gives the same number
    model, _, _ = load_fcmae(out / "checkpoint-last.pth")
    from fcmae.monitor import ReconstructionMonitor
    monitor = ReconstructionMonitor(labeled_folder / "val", 64, 32, 0.6, epochs=3, seed=0)
    assert monitor(model, 2)["val_loss"] == pytest.approx(epochs[-1]["val_loss"], rel=1e-5)
    assert 0 <= epochs[-1]["knn_top1"] <= 100 and epochs[-1]["knn_top1"] * 8 / 100 == pytest.approx(
        round(epochs[-1]["knn_top1"] * 8 / 100))                          # a whole number of the 8 val images


def test_monitor_data_problems_stop_before_training(tmp_path, labeled_folder, capsys):
    out = tmp_path / "run"
    assert exit_code(pretrain_main, ["--input-size", "64", "--epochs", "1", "--output-dir", out,
                                     "--knn-data-path", labeled_folder / "train"]) == 2
    assert "is not a directory" in capsys.readouterr().err           # DATA/train/train: no train/ split
    assert not (out / "checkpoint-last.pth").exists()


def test_knn_and_analyze_default_to_the_size_the_weights_were_trained_at(labeled_folder, tmp_path, capsys):
    """A 64-px run's checkpoint, and its dense conversion, are evaluated at 64 px unless
    --input-size says otherwise; the output names the size and where it came from."""
    from fcmae.cli.analyze import main as analyze_main
    from fcmae.cli.convert import main as convert_main
    torch.manual_seed(0)
    model = fcmae.create_fcmae("convnextv2_atto", decoder_dim=16)
    torch.save({"model": model.state_dict(), "args": {"input_size": 64}}, tmp_path / "fcmae.pth")
    assert exit_code(convert_main, [tmp_path / "fcmae.pth", "-o", tmp_path / "dense.pth"]) == 0
    for weights in ("fcmae.pth", "dense.pth"):
        capsys.readouterr()
        assert exit_code(knn_main, [tmp_path / weights, "--data-path", labeled_folder, "--k", 3,
                                    "--num-workers", 0]) == 0
        assert "images at 64px (the weights' training size)" in capsys.readouterr().err, weights
    assert exit_code(knn_main, [tmp_path / "fcmae.pth", "--data-path", labeled_folder, "--k", 3,
                                "--num-workers", 0, "--input-size", 96]) == 0
    assert "images at 96px (--input-size)" in capsys.readouterr().err
    assert exit_code(analyze_main, [tmp_path / "fcmae.pth", "--data-path", labeled_folder / "val",
                                    "-o", tmp_path / "collapse.png"]) == 0
    assert json.loads((tmp_path / "collapse.json").read_text())["input_size"] == 64
    assert exit_code(analyze_main, [tmp_path / "fcmae.pth", "random:convnextv2_atto", "--data-path",
                                    labeled_folder / "val", "-o", tmp_path / "two.png"]) == 0
    assert json.loads((tmp_path / "two.json").read_text())["input_size"] == 64
