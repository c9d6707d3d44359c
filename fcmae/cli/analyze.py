"""Per block, the average pairwise cosine distance between the channels of its activations (ConvNeXt V2
paper, Sec. 3: low values = feature collapse), for one or more sets of weights overlaid in one plot.
Writes OUTPUT (PNG) and OUTPUT with .json (every number)."""
from __future__ import annotations

import argparse
import json
import logging
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from ..analysis import WHERE, analysis_points, collapse_profile, feature_maps
from ..atomic import atomic_write
from ..data import (
    DEMO_HELDOUT_PHOTOS,
    DEMO_TRAIN_PHOTOS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    demo_photo_paths,
    find_images,
    load_center_crops,
    spread_indices,
)
from ..run import check_device
from ..weights import load_encoder, trained_size
from . import check_output_file, cli_main, new_parser, number

log = logging.getLogger("fcmae.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("fcmae-analyze", __doc__)
    add = parser.add_argument
    add("weights", nargs="+",
        help="FCMAE checkpoints (ours or official), converted dense or timm files/folders, fine-tuning "
             "checkpoints, or random:MODEL for random init; LABEL=WEIGHTS names a line in the plot")
    add("-o", "--output", required=True, help="the plot, e.g. collapse.png (its folder must exist)")
    add("--data-path", default=None, help="folder of images (default: the built-in demo photos)")
    add("--max-images", type=number(int, 1), default=64,
        help="analyse at most this many images, evenly spread over the path-sorted list (so over the classes)")
    add("--input-size", type=number(int, 32), default=None,
        help="center crop side in pixels (default: the size the weights were trained at, else 224)")
    add("--batch-size", type=number(int, 1), default=8)
    add("--where", choices=WHERE, default="expansion",
        help="expansion: the MLP's expansion output after its activation (and GRN), the input of its "
             "projection; block-output: each block's output")
    add("--model", default=None, help="model name, if it cannot be read from or inferred for a file")
    add("--feature-maps", default=None, metavar="BLOCK",
        help="also write OUTPUT_maps.png: the first --channels activation maps of BLOCK (a name such as "
             "stages.2.3, or an index) for one image, one row per weights")
    add("--channels", type=number(int, 1), default=32, help="maps shown by --feature-maps")
    add("--image-index", type=number(int, 0), default=0, help="the image --feature-maps shows")
    add("--seed", type=number(int, 0), default=0, help="seed of random:MODEL initialisations")
    add("--device", default="cpu")
    add("--force", action="store_true", help="overwrite the plot, its .json and _maps.png if they exist")
    return parser


def load_images(data_path: str | None, input_size: int, max_images: int) -> list[torch.Tensor]:
    """Up to ``max_images`` (3, S, S) normalised center crops (default: the demo photos)."""
    paths = find_images(data_path) if data_path else demo_photo_paths(DEMO_TRAIN_PHOTOS + DEMO_HELDOUT_PHOTOS)
    paths = [paths[index] for index in spread_indices(len(paths), max_images)]   # every class, not the first
    return load_center_crops(paths, input_size)


def parse_weights(spec: str) -> tuple[str, str]:
    """(label, source) of a positional argument: ``LABEL=SOURCE`` or ``SOURCE``."""
    label, separator, source = spec.partition("=")
    if separator and label and not Path(spec).exists():
        return label, source
    return (spec if spec.startswith("random:") else Path(spec).stem if Path(spec).suffix else Path(spec).name), spec


def common_input_size(models: list, requested: int | None) -> int:
    """One image side for every compared model: ``requested``, else the size their weights were
    trained at (they must agree), else 224; logged with where it came from."""
    if requested:
        log.info(f"images at {requested}px (--input-size)")
        return requested
    trained = {trained_size(model) for model in models} - {None}
    if len(trained) > 1:
        raise ValueError(f"the weights were trained at different sizes ({sorted(trained)} px): pass --input-size")
    size, source = (next(iter(trained)), "the weights' training size") if trained else (224, "default")
    log.info(f"images at {size}px ({source})")
    return size


def stage_boundaries(names: list[str], stages: list[int]) -> list[float]:
    return [index - 0.5 for index in range(1, len(names)) if stages[index] != stages[index - 1]]


def run(args: argparse.Namespace) -> int:
    output = check_output_file(args.output, (".png",))
    report_path, maps_path = output.with_suffix(".json"), output.with_name(output.stem + "_maps.png")
    existing = [path for path in (output, report_path, maps_path if args.feature_maps else None)
                if path is not None and path.exists()]
    if existing and not args.force:
        raise FileExistsError(f"{', '.join(map(str, existing))} exist(s); pass --force to overwrite")
    device = check_device(args.device)
    sources = [parse_weights(spec) for spec in args.weights]
    models = [(label, *load_encoder(source, args.model, args.seed)) for label, source in sources]   # load all first
    input_size = common_input_size([model for _, model, _ in models], args.input_size)
    images = load_images(args.data_path, input_size, args.max_images)
    results, maps = [], []
    for label, model, model_name in models:
        model.to(device)
        points = analysis_points(model, model_name)
        batches = [torch.stack(images[start:start + args.batch_size]).to(device)
                   for start in range(0, len(images), args.batch_size)]
        profile, spread = collapse_profile(model, points, tqdm(batches, desc=label, unit="batch", leave=False),
                                           args.where)
        results.append({"label": label, "model": model_name, "distances": profile, "spread": spread,
                        "stages": [point.stage for point in points]})
        if args.feature_maps is not None:
            point = _pick_point(points, args.feature_maps)
            maps.append((label, point.name, feature_maps(model, point, images[min(args.image_index, len(images) - 1)]
                                                          .to(device), args.where, args.channels).cpu()))
    report = {"where": args.where, "images": len(images), "input_size": input_size, "results": results}
    _print_table(results)
    figure = _plot(results, args.where, len(images))
    atomic_write(output, lambda file: figure.savefig(file, format="png", dpi=120))
    atomic_write(report_path, lambda file: file.write(json.dumps(report, indent=1).encode()))
    written = [output, report_path]
    if maps:
        maps_figure = _plot_maps(maps, images[min(args.image_index, len(images) - 1)])
        atomic_write(maps_path, lambda file: maps_figure.savefig(file, format="png", dpi=100))
        written.append(maps_path)
    log.info("wrote " + ", ".join(str(path) for path in written))
    return 0


def _pick_point(points, block: str):
    if block.isdigit() and int(block) < len(points):
        return points[int(block)]
    for point in points:
        if point.name == block:
            return point
    raise ValueError(f"--feature-maps {block!r}: no such block; use an index below {len(points)} or one of "
                     f"{points[0].name} … {points[-1].name}")


def _print_table(results: list[dict]) -> None:
    names = list(results[0]["distances"])
    if any(list(result["distances"]) != names for result in results):   # different architectures: one per line
        for result in results:
            values = " ".join(f"{value:.3f}" for value in result["distances"].values())
            log.info(f"{result['label']} ({result['model']}): {values}")
        return
    width = max(len(result["label"]) for result in results)
    log.info("block".ljust(12) + "  ".join(result["label"].rjust(width) for result in results))
    for name in names:
        log.info(name.ljust(12) + "  ".join(f"{result['distances'][name]:.4f}".rjust(width) for result in results))
    log.info("mean".ljust(12) + "  ".join(
        f"{sum(r['distances'].values()) / len(names):.4f}".rjust(width) for r in results))


def _plot(results: list[dict], where: str, num_images: int):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    figure = Figure(figsize=(8, 4.5))
    axes = figure.subplots()
    for result in results:
        blocks = range(len(result["distances"]))
        means, spreads = list(result["distances"].values()), list(result["spread"].values())
        line, = axes.plot(blocks, means, marker="o", markersize=3, label=f"{result['label']} ({result['model']})")
        axes.fill_between(blocks, [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)],
                          color=line.get_color(), alpha=0.15, linewidth=0)
    first = results[0]
    for boundary in stage_boundaries(list(first["distances"]), first["stages"]):
        axes.axvline(boundary, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("block (dotted lines: stage boundaries)")
    axes.set_ylabel("average pairwise cosine distance\n(band: ± 1 std over images)")
    axes.set_title(f"feature collapse: {where} activations, {num_images} images")
    axes.margins(y=0.1)   # scaled to the data: lines near 0.49 must stay apart
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _plot_maps(maps: list[tuple[str, str, torch.Tensor]], image: torch.Tensor, per_row: int = 8):
    """The input ``image`` (3, H, W, normalised) in the first column, then each weights' channel
    maps in rows of ``per_row``, one block of rows per weights, titled with label and block."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    picture = (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    rows_each = [-(-len(channel_maps) // per_row) for _, _, channel_maps in maps]
    figure = Figure(figsize=(1.2 * (per_row + 1), 1.25 * sum(rows_each) + 0.3))
    grid = figure.subplots(sum(rows_each), per_row + 1, squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    first_row = 0
    for (label, block, channel_maps), rows in zip(maps, rows_each):
        grid[first_row][0].imshow(picture)
        grid[first_row][0].set_title("input", fontsize=7)
        grid[first_row][1].set_title(f"{label}: {block}, channels 0–{len(channel_maps) - 1}", fontsize=7, loc="left")
        for index, channel_map in enumerate(channel_maps):
            grid[first_row + index // per_row][1 + index % per_row].imshow(channel_map.numpy(), cmap="viridis",
                                                                           vmin=0, vmax=1)
        first_row += rows
    figure.tight_layout()
    return figure


main = partial(cli_main, build_parser, run)   # main(argv=None): parse, run, exit with its code


if __name__ == "__main__":
    main()
