"""Feature-collapse metric, any-weights loading, fcmae-analyze and fcmae-visualize."""
import json

import pytest
import timm
import torch
from PIL import Image

import fcmae
from fcmae.analysis import analysis_points, capture, channel_cosine_distance, collapse_profile
from fcmae.cli.analyze import main as analyze_main
from fcmae.cli.visualize import main as visualize_main
from fcmae.convert import convert_state, save_converted
from fcmae.weights import extract_features, load_encoder, load_fcmae

from .helpers import assert_close, exit_code, randomize_


def direct_distance(activation):
    """The paper's formula, term by term, for one image (C, H, W)."""
    channels = activation.flatten(1)
    count = channels.shape[0]
    total = 0.0
    for i in range(count):
        for j in range(count):
            cosine = 1.0 if i == j else torch.nn.functional.cosine_similarity(channels[i], channels[j], dim=0).item()
            total += (1 - cosine) / 2
    return total / count ** 2


def test_distance_is_zero_for_identical_channels_and_half_for_orthogonal_ones():
    pattern = torch.rand(1, 1, 5, 5)
    assert channel_cosine_distance(pattern * torch.rand(1, 6, 1, 1) + 0 * pattern).item() == pytest.approx(0, abs=1e-6)
    orthogonal = torch.eye(16).reshape(1, 16, 4, 4)                  # channel i lights pixel i only
    assert channel_cosine_distance(orthogonal).item() == pytest.approx(0.5 * (1 - 1 / 16), abs=1e-6)


def test_distance_equals_the_direct_formula_per_image():
    activations = torch.randn(3, 7, 4, 5)
    activations[1, 2] = 0                                              # a dead channel: cosine 0 with the rest
    expected = [direct_distance(image) for image in activations]
    assert channel_cosine_distance(activations).tolist() == pytest.approx(expected, abs=1e-6)


def test_expansion_capture_is_the_input_of_the_projection():
    model = randomize_(fcmae.create_model("convnextv2_atto", num_classes=0), std=0.05).eval()
    images = torch.randn(2, 3, 64, 64)
    points = analysis_points(model, "convnextv2_atto")
    assert [p.name for p in points[:3]] == ["stages.0.0", "stages.0.1", "stages.1.0"] and len(points) == 12
    with capture(points[:1], "expansion") as activations, torch.no_grad():
        model.forward_features(images)
        block = model.stages[0][0]
        x = block.dwconv(model.downsample_layers[0](images)).permute(0, 2, 3, 1)
        expected = block.grn(block.act(block.pwconv1(block.norm(x)))).permute(0, 3, 1, 2)
    assert_close(activations["stages.0.0"], expected)
    with capture(points[-1:], "block-output") as activations, torch.no_grad():
        out = model.forward_features(images)
    assert torch.equal(activations["stages.3.1"], out)


def test_models_without_analysis_points_are_refused():
    with pytest.raises(ValueError, match="declares no blocks"):
        analysis_points(torch.nn.Identity(), "toy")


@pytest.fixture(scope="module")
def fcmae_files(tmp_path_factory):
    """An FCMAE checkpoint of ConvNeXt V1 and its dense, timm-file and timm-folder conversions."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(3)
    model = randomize_(fcmae.create_fcmae("convnext_atto", decoder_dim=32), std=0.05).eval()
    torch.save({"model": model.state_dict(), "model_name": "convnext_atto",
                "args": {"input_size": 64, "mask_ratio": 0.5, "norm_pix_loss": True}}, folder / "fcmae.pth")
    for fmt, name in (("official", "dense.pth"), ("timm", "timm.pth"), ("timm", "timm_folder")):
        dense, _ = convert_state(model.state_dict(), fmt=fmt)
        save_converted(dense, "convnext_atto", fmt, folder / name, input_size=64)
    return folder, model


@pytest.mark.parametrize("name", ["fcmae.pth", "dense.pth", "timm.pth", "timm_folder"])
def test_load_encoder_reads_every_kind_of_weights(fcmae_files, name):
    folder, model = fcmae_files
    encoder, model_name = load_encoder(folder / name)
    assert model_name == "convnext_atto"
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.encoder(images, torch.zeros(2, 4))
    assert_close(extract_features(encoder, images, pooled=False), expected)
    assert_close(extract_features(encoder, images), expected.mean(dim=(-2, -1)))


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnext_atto", "internimage_t", "revcol_t"])
def test_per_stage_features_have_the_stage_strides(name):
    encoder, _ = load_encoder(f"random:{name}")
    images = torch.randn(1, 3, 64, 64)
    maps = extract_features(encoder, images, pooled=False, per_stage=True)
    assert [tuple(m.shape[-2:]) for m in maps] == [(64 // s, 64 // s) for s in encoder.feature_strides]
    assert torch.equal(maps[-1], extract_features(encoder, images, pooled=False))
    assert [p.shape for p in extract_features(encoder, images, per_stage=True)] == [m.shape[:2] for m in maps]


def test_load_encoder_random_init_and_unknown_weights(tmp_path):
    state = torch.random.get_rng_state()
    encoder, name = load_encoder("random:convnextv2_atto", seed=5)
    assert name == "convnextv2_atto" and not encoder.training
    assert torch.equal(torch.random.get_rng_state(), state)                    # global stream untouched
    again, _ = load_encoder("random:convnextv2_atto", seed=5)
    other, _ = load_encoder("random:convnextv2_atto", seed=6)
    weight = "stages.0.0.pwconv1.weight"
    assert torch.equal(again.state_dict()[weight], encoder.state_dict()[weight])
    assert not torch.equal(other.state_dict()[weight], encoder.state_dict()[weight])
    torch.save({"model": {"other.weight": torch.zeros(3, 3)}}, tmp_path / "other.pth")
    with pytest.raises(fcmae.checkpoint.CheckpointError, match="fit no known model"):
        load_encoder(tmp_path / "other.pth")


def test_timm_layout_state_round_trips_through_load_encoder(tmp_path):
    reference = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0).eval()
    torch.save(reference.state_dict(), tmp_path / "timm_own.pth")
    encoder, name = load_encoder(tmp_path / "timm_own.pth")
    assert name == "convnextv2_atto"
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(encoder.forward_features(images), reference.forward_features(images))


def image_folder(path, count=3):
    path.mkdir()
    for index in range(count):
        Image.fromarray((torch.rand(80, 96, 3) * 255).byte().numpy()).save(path / f"{index}.png")
    return path


def test_analyze_cli_overlays_weights_and_writes_plot_json_and_maps(fcmae_files, tmp_path, capsys):
    folder, _ = fcmae_files
    images = image_folder(tmp_path / "images")
    out = tmp_path / "collapse.png"
    assert exit_code(analyze_main, ["v1=" + str(folder / "fcmae.pth"), "random:convnextv2_atto",
                                    "--data-path", images, "--input-size", 64, "-o", out,
                                    "--feature-maps", "stages.2.1", "--channels", 8]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in report["results"]] == ["v1", "random:convnextv2_atto"] and report["images"] == 3
    assert Image.open(out).format == "PNG" and Image.open(tmp_path / "collapse_maps.png").format == "PNG"
    encoder, _ = load_encoder(folder / "fcmae.pth")
    from fcmae.cli.analyze import load_images
    batch = torch.stack(load_images(str(images), 64, 64))
    expected, spread = collapse_profile(encoder, analysis_points(encoder, "convnext_atto"), [batch])
    assert report["results"][0]["distances"] == pytest.approx(expected, abs=1e-6)
    per_image = [collapse_profile(encoder, analysis_points(encoder, "convnext_atto"), [image[None]])[0]
                 for image in batch]                                   # the spread is the std over images
    assert spread == pytest.approx({name: float(torch.tensor([p[name] for p in per_image], dtype=torch.float64)
                                                .std(unbiased=False)) for name in spread}, abs=1e-6)
    assert report["results"][0]["spread"] == pytest.approx(spread, abs=1e-6)
    assert "stages.3.1" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["empty folder", "unreadable images", "missing output folder", "not weights",
                                  "unknown block"])
def test_analyze_bad_input_is_one_line_and_writes_nothing(case, fcmae_files, tmp_path, capsys):
    folder, _ = fcmae_files
    data = tmp_path / "data"
    data.mkdir()
    if case == "unreadable images":
        (data / "broken.png").write_bytes(b"not a png")
    elif case != "empty folder":
        image_folder(data / "ok")
    out = tmp_path / ("missing/collapse.png" if case == "missing output folder" else "collapse.png")
    weights = tmp_path / "data" / "ok" / "0.png" if case == "not weights" else folder / "fcmae.pth"
    extra = ["--feature-maps", "stages.9.9"] if case == "unknown block" else []
    assert exit_code(analyze_main, [weights, "--data-path", data, "--input-size", 64, "-o", out] + extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "Traceback" not in err[0]
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_visualize_writes_the_four_rows_for_an_fcmae_checkpoint(fcmae_files, tmp_path, capsys):
    folder, model = fcmae_files
    images = image_folder(tmp_path / "images", count=2)
    out = tmp_path / "recon.png"
    assert exit_code(visualize_main, [folder / "fcmae.pth", "--data-path", images, "-o", out]) == 0
    picture = Image.open(out)
    assert picture.size == (96 + 2 + 2 * (64 + 2), 2 + 4 * (64 + 2))   # input size and mask ratio from the file;
    assert picture.getpixel((2, 2)) == (255, 255, 255)                 # the row names' margin on the left
    assert "mask ratio 0.5" in capsys.readouterr().err
    loaded, name, _ = load_fcmae(folder / "fcmae.pth")
    assert name == "convnext_atto" and loaded.norm_pix_loss
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_visualize_refuses_weights_without_a_decoder(fcmae_files, tmp_path, capsys):
    folder, _ = fcmae_files
    assert exit_code(visualize_main, [folder / "dense.pth", "-o", tmp_path / "recon.png"]) == 2
    assert "holds dense (converted, fine-tuned or official) weights, not an FCMAE encoder" in capsys.readouterr().err
    assert not (tmp_path / "recon.png").exists()


def test_few_images_are_taken_from_every_class_not_the_first(labeled_folder, monkeypatch):
    """--max-images 2 of an ImageFolder (6 images per class) picks one per class."""
    import fcmae.cli.analyze as analyze_cli
    picked = []
    monkeypatch.setattr(analyze_cli, "load_center_crops", lambda paths, size: picked.extend(paths) or [])
    analyze_cli.load_images(labeled_folder / "train", 64, 2)
    assert sorted(path.parent.name for path in picked) == ["class0", "class1"]
