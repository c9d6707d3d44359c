"""Pack an ImageFolder tree (labels kept as 'cls') or a flat folder of images into WebDataset tar
shards with the original bytes (no re-encoding), plus shards.json (sample counts, class names) that
fcmae-pretrain and fcmae-finetune read."""
from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path

from tqdm import tqdm

from ..shards import SHARD_INDEX, STAGING_PREFIX, write_shards
from . import POSITIVE, POSITIVE_INT, SEED, cli_main, new_parser

log = logging.getLogger("fcmae.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("fcmae-shards", __doc__)
    parser.add_argument("source", help="image folder")
    parser.add_argument("destination", help="folder for the shards (created)")
    parser.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ...")
    parser.add_argument("--max-count", type=POSITIVE_INT, default=10_000, help="samples per shard at most")
    parser.add_argument("--max-size", type=POSITIVE, default=1e9, help="bytes per shard at most")
    parser.add_argument("--no-labels", action="store_true", help="ignore class folders (unlabeled shards)")
    parser.add_argument("--force", action="store_true", help="write into a folder that already holds shards")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the packing order (shuffled: shards mix classes)")
    parser.add_argument("--no-shuffle", action="store_true", help="pack in path order (class by class)")
    return parser


def run(args: argparse.Namespace) -> int:
    destination = Path(args.destination)
    if not args.force and destination.is_dir() and (
            (destination / SHARD_INDEX).exists() or any(destination.glob(f"{args.prefix}-*.tar"))):
        raise FileExistsError(f"{destination} already holds shards; pass --force or choose another folder")
    with tqdm(desc="packing", unit="img") as bar:
        summary = write_shards(args.source, destination, args.prefix, args.max_count, args.max_size,
                               labeled=False if args.no_labels else None, progress=bar,
                               shuffle_seed=None if args.no_shuffle else args.seed)
    for problem in summary["skipped"]:
        log.warning(f"skipped {problem}")
    written = {shard["name"] for shard in summary["shards"]}
    earlier = sorted(path.name for path in destination.glob(f"{args.prefix}-*.tar") if path.name not in written)
    if earlier:
        log.warning(f"{len(earlier)} shard(s) of an earlier set remain in {destination} ({', '.join(earlier[:3])}"
                    f"{' …' if len(earlier) > 3 else ''}); they are not in the new {SHARD_INDEX}, which readers "
                    f"refuse them against: delete them yourself")
    for leftover in destination.glob(f"{STAGING_PREFIX}*"):
        log.warning(f"{leftover} was left by a killed fcmae-shards; delete it")
    labels = f", {len(summary['classes'])} classes" if summary["classes"] else ", unlabeled"
    numbers = [shard["name"][len(args.prefix) + 1:-len(".tar")] for shard in summary["shards"]]
    log.info(f"wrote {summary['samples']} images{labels} into {len(numbers)} shards in {destination}; "
          f"skipped {len(summary['skipped'])}; index: {destination / SHARD_INDEX}\n"
          f"use: --data-path '{destination}/{args.prefix}-{{{numbers[0]}..{numbers[-1]}}}.tar'")
    return 0


main = partial(cli_main, build_parser, run)   # main(argv=None): parse, run, exit with its code


if __name__ == "__main__":
    main()
