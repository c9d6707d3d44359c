"""WebDataset tar shards: streaming them for training on one or many machines, and packing
image folders into them (``fcmae-shards``).

A shard holds samples ``KEY.jpg`` (or .png, .webp, …: the original bytes) and, for labeled
data, ``KEY.cls`` (the class index as text). ``fcmae-shards`` also writes ``shards.json`` beside
the shards: every shard's sample count and the class names, so an epoch's length is known
without reading the data.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import random
import re
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm

from . import distributed
from .atomic import atomic_write
from .data import (
    IMAGE_EXTENSIONS,
    READ_ERRORS,
    DataError,
    augment,
    class_labels,
    find_images,
    load_rgb,
    seed_sample_rngs,
)

SHARD_INDEX = "shards.json"
IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def _webdataset():
    """The ``webdataset`` module, imported where shards are read or written: a declared
    requirement, but a machine that only trains from folders (a bare GPU node) can lack it."""
    try:
        import webdataset
    except ImportError:
        raise DataError("tar shards need the webdataset package (pip install 'webdataset>=1.0.2'); "
                        "image folders do not") from None
    return webdataset


def is_shard_spec(data_path: str | None) -> bool:
    """A ``--data-path`` that names tar shards (a file, a brace pattern, or a ``pipe:`` command)."""
    return data_path is not None and (data_path.startswith("pipe:") or ".tar" in data_path)


@dataclass
class ShardSet:
    """The shards of one spec with their sample counts and (if labeled) the class names."""

    urls: list[str]
    samples: list[int]
    classes: list[str]

    @property
    def total(self) -> int:
        return sum(self.samples)


def open_shard_set(spec: str, index: str | os.PathLike | None = None) -> ShardSet:
    """Expand ``spec`` and find each shard's sample count: from ``index`` (a ``shards.json``),
    else the ``shards.json`` beside local shards, else by reading the local tar headers.
    ``pipe:`` specs need ``index``. Raises :class:`DataError` for a spec that matches nothing."""
    _webdataset()
    from braceexpand import braceexpand  # installed with webdataset
    urls = list(braceexpand(spec))
    local = not spec.startswith("pipe:")
    if local:
        missing = [url for url in urls if not Path(url).is_file()]
        if len(missing) == len(urls):
            raise DataError(f"shard spec {spec!r} matches no file")
        if missing:
            raise DataError(f"{len(missing)} of {len(urls)} shards of {spec!r} do not exist (e.g. {missing[0]})")
    if index is None and local and (Path(urls[0]).parent / SHARD_INDEX).is_file():
        index = Path(urls[0]).parent / SHARD_INDEX
    if index is not None:
        entries, classes = read_shard_index(index)
        unknown = [url for url in urls if _shard_name(url) not in entries]
        if unknown:
            raise DataError(f"{index} does not list shard {_shard_name(unknown[0])!r}")
        if local:
            for url in urls:
                check_against_index(url, entries[_shard_name(url)], index)
        shard_set = ShardSet(urls, [entries[_shard_name(url)]["samples"] for url in urls], classes)
    elif not local:
        raise DataError(f"a pipe: spec cannot be counted without reading it; pass --shard-index "
                        f"with the {SHARD_INDEX} that fcmae-shards wrote")
    else:
        shard_set = ShardSet(urls, [_count_samples(url) for url in urls], [])
    if shard_set.total == 0:
        raise DataError(f"the shards of {spec!r} hold no image samples"
                        f"{f' (according to {index})' if index is not None else ''}")
    return shard_set


# A tar member takes a 512-byte header and at least one 512-byte block of data: a sample
# (one image member at least) cannot take fewer bytes than this.
MIN_SAMPLE_BYTES = 1024


def read_shard_index(index: str | os.PathLike) -> tuple[dict[str, dict], list[str]]:
    """The entries of a ``shards.json`` by shard name (``samples``, and ``bytes`` where
    fcmae-shards recorded it) and its class names, every field checked: a file that is missing,
    not JSON or not in this form is a one-line :class:`DataError` naming the file."""
    path = Path(index)
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except IsADirectoryError:
        raise DataError(f"shard index {path} is a folder; pass the {SHARD_INDEX} file inside it") from None
    except FileNotFoundError:
        raise DataError(f"shard index {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"shard index {path} cannot be read as JSON: {error}") from None

    def bad(what: str) -> DataError:
        return DataError(f"shard index {path} is not a {SHARD_INDEX} written by fcmae-shards: {what}")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("shards"), list):
        raise bad("no 'shards' list at its top level")
    classes = recorded.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise bad("'classes' is not a list of names")
    entries: dict[str, dict] = {}
    for number, entry in enumerate(recorded["shards"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise bad(f"shard entry {number} has no 'name'")
        for field in ("samples", "bytes"):
            value = entry.get(field, 0 if field == "bytes" else None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(f"'{field}' of shard {entry['name']!r} is {value!r}, not a count")
        entries[entry["name"]] = entry
    return entries, classes


def check_against_index(url: str, entry: dict, index: str | os.PathLike) -> None:
    """Refuse a local shard that is not the file ``index`` describes: another size than the
    recorded ``bytes``, or fewer bytes than its recorded sample count needs."""
    size = Path(url).stat().st_size
    if entry.get("bytes") and size != entry["bytes"]:
        raise DataError(f"{url} has {size} bytes, but {index} records {entry['bytes']}: the shards and their index "
                        f"are from different writes (an interrupted fcmae-shards?); write the set again")
    if entry["samples"] * MIN_SAMPLE_BYTES > size:
        raise DataError(f"{index} says {url} holds {entry['samples']} samples, more than its {size} bytes can "
                        f"hold; the index does not belong to these shards: write the set again")


def _shard_name(url: str) -> str:
    """The shard's file name: of the file, or of the last ``*.tar`` word of a pipe command."""
    if url.startswith("pipe:"):
        url = next((word for word in reversed(url.split()) if ".tar" in word), url)
    return Path(url).name


def _count_samples(path: str) -> int:
    """Image samples in a local tar (member headers only, no data read)."""
    try:
        with tarfile.open(path) as tar:
            return len({member.name.rsplit(".", 1)[0] for member in tar
                        if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in IMAGE_KEYS})
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"cannot read shard {path}: {error}") from None


class ShardImages(IterableDataset):
    """Images (and ``cls`` labels) streamed from tar shards, split across ranks and loader workers.

    Training (``train=True``): an endless stream of epochs from the one set by ``set_epoch``.
    Each epoch shuffles the shard order with ``(seed, epoch)``; rank ``r`` of ``R`` takes every
    R-th shard, and loader worker ``w`` of ``W`` every W-th of those; samples are shuffled in a
    buffer. Every rank yields the same number of batches per epoch (``plan_epochs``: at most
    ``total // R`` samples, in whole batches, equal per worker), so DDP ranks take equal steps:
    with equal shards and a shard count divisible by R·W every sample is seen once per epoch
    but for that remainder; a worker whose shards run short starts them again. Evaluation
    (``train=False``): each sample exactly once across all ranks and workers, in order.

    Unreadable samples (and the rest of a truncated shard), and labels that are missing, not a
    number or outside the classes, are skipped with a warning and counted in ``num_skipped``,
    as for folders; ``max_consecutive_skips`` unusable samples in a row end the run with a
    :class:`DataError` instead of spinning forever. Each sample's augmentation is seeded by
    its place among the samples read (not those produced), so a skipped sample never makes
    the next one repeat its draws.
    """

    max_consecutive_skips = 200

    def __init__(self, shard_set: ShardSet, transform: Callable[[Image.Image], torch.Tensor],
                 labeled: bool, batch_size: int, seed: int = 0, train: bool = True,
                 shuffle_buffer: int = 1000) -> None:
        self.shards = shard_set
        self.transform = transform
        self.labeled = labeled
        self.batch_size = batch_size
        self.seed = seed
        self.train = train
        self.shuffle_buffer = shuffle_buffer
        self.classes = shard_set.classes
        self.start_epoch = self.skip_batches = 0
        self.batches_per_epoch = self.samples_per_rank() // batch_size
        self._skipped = torch.multiprocessing.Value("i", 0)   # shared with forked loader workers

    @property
    def num_skipped(self) -> int:
        return self._skipped.value

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The first epoch of the training stream, and how many of the loader's first batches of
        it to leave out (a run resumed from a mid-epoch checkpoint: each worker reads and drops
        its share, so the batches after them are those of an uninterrupted run); set before the
        loader iterator is made."""
        self.start_epoch, self.skip_batches = epoch, skip_batches

    def samples_per_rank(self) -> int:
        return self.shards.total // distributed.world_size()

    def plan_epochs(self, batches_per_epoch: int) -> None:
        """Batches per rank and epoch (a multiple of the loader's worker count)."""
        self.batches_per_epoch = batches_per_epoch

    def check_workers(self, num_workers: int) -> None:
        """Refuse a split that leaves a rank's loader worker without shards (training only)."""
        needed = distributed.world_size() * max(1, num_workers)
        if self.train and len(self.shards.urls) < needed:
            raise DataError(f"{len(self.shards.urls)} shards cannot feed {distributed.world_size()} process(es) x "
                            f"{max(1, num_workers)} loader worker(s); write at least {needed} shards "
                            f"(fcmae-shards --max-count) or lower --num-workers")

    def __len__(self) -> int:
        if not self.train:
            return self.shards.total   # all ranks together
        return self.batches_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, int]]:
        rank, world = distributed.rank(), distributed.world_size()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if not self.train:
            for sample in self._samples(self.shards.urls[rank::world][worker::workers]):
                item = self._decode(sample)
                if item is not None:
                    yield item
            return
        quota = self.batches_per_epoch // workers * self.batch_size   # equal per worker: see plan_epochs
        # The loader takes whole batches from its workers in turn, starting with worker 0: in an
        # uninterrupted run worker w makes batches w, w + W, … of every epoch. A loader resumed
        # after S batches starts with worker 0 again, so worker w plays the part of worker
        # (w + S) mod W (in every epoch: an epoch is a multiple of W batches) and first drops
        # the batches that part made before the checkpoint.
        role = (worker + self.skip_batches) % workers
        for epoch in itertools.count(self.start_epoch):
            order = list(range(len(self.shards.urls)))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            mine = [self.shards.urls[i] for i in order[rank::world][role::workers]]
            if not mine:
                raise DataError(f"loader worker {worker} of rank {rank} has no shard; write more shards")
            rng = random.Random(f"{self.seed}-{epoch}-{rank}-{role}")
            produced = skipped_in_a_row = 0
            skip = len(range(role, self.skip_batches, workers)) * self.batch_size if epoch == self.start_epoch else 0
            for attempt, sample in enumerate(self._shuffled_passes(mine, rng)):
                item = self._decode(sample, (epoch, rank, role, attempt))
                if item is None:
                    skipped_in_a_row += 1
                    if skipped_in_a_row >= self.max_consecutive_skips:
                        raise DataError(f"{skipped_in_a_row} samples in a row from {mine[0]} … were unusable "
                                        f"(see the warnings above); check the shards and their labels")
                    continue
                skipped_in_a_row = 0
                produced += 1
                if produced > skip:
                    yield item
                if produced == quota:
                    break

    def _shuffled_passes(self, urls: Sequence[str], rng: random.Random) -> Iterator[dict]:
        """Passes over the samples of ``urls``, each shuffled through a buffer and drained at its
        end (no sample twice in a pass); a new pass starts when the epoch's quota needs more.

        The buffer starts yielding once it holds ``shuffle_buffer // 10`` samples and keeps
        growing (two read per one yielded) up to ``shuffle_buffer``, so an epoch's first sample
        does not wait for a full buffer."""
        start_after = max(1, self.shuffle_buffer // 10)
        while True:
            buffer: list[dict] = []
            read = 0
            for sample in self._samples(urls):
                read += 1
                buffer.append(sample)
                growing = len(buffer) < self.shuffle_buffer and read % 2
                if len(buffer) >= start_after and not growing:
                    yield buffer.pop(rng.randrange(len(buffer)))
            if read == 0:
                raise DataError(f"shards {urls[0]} … hold no readable image")
            rng.shuffle(buffer)
            yield from buffer

    def check_readable(self, what: str) -> None:
        """Read samples in shard order until one is usable (an image, and a valid label where
        labeled), before training starts; none among the first ``max_consecutive_skips`` (or
        in the whole set) is a :class:`DataError` naming ``what`` and the first problem. Not
        counted as skipped."""
        problems: list[str] = []
        read = 0
        with contextlib.closing(self._samples(self.shards.urls, on_error=lambda error: problems.append(str(error)))) \
                as samples:
            for read, sample in enumerate(samples, 1):
                try:
                    self._read(sample)
                    return
                except (*READ_ERRORS, KeyError) as error:
                    problems.append(f"{_where(sample)}: {error}")
                if read >= self.max_consecutive_skips:
                    break
        raise DataError(f"{what}: no usable sample in {self.shards.urls[0]} … ({read} sample(s) read; first problem: "
                        f"{problems[0] if problems else 'the shards hold no sample'})")

    def _samples(self, urls: Sequence[str], on_error: Callable[[Exception], None] | None = None) -> Iterator[dict]:
        def skip(error: Exception) -> bool:
            if on_error is None:
                self._count_skip(f"shard read failed: {error}")
            else:
                on_error(error)
            return True      # go on with the next shard
        yield from _webdataset().tarfile_samples([{"url": url} for url in urls], handler=skip)

    def _read(self, sample: dict) -> tuple[Image.Image, int | None]:
        """(the sample's image, its label or None); READ_ERRORS or KeyError where it has no usable one."""
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise ValueError("no image in the sample")
        try:
            image = load_rgb(io.BytesIO(sample[key]))
        except UnidentifiedImageError:
            raise UnidentifiedImageError(f"its .{key} is not an image Pillow can read") from None
        return image, self._label(sample) if self.labeled else None

    def _decode(self, sample: dict, position: tuple[int, ...] | None = None):
        where = _where(sample)
        try:
            image, label = self._read(sample)
        except (*READ_ERRORS, KeyError) as error:
            self._count_skip(f"skipping unreadable sample {where}: {error}")
            return None
        if position is not None and get_worker_info() is not None:
            seed_sample_rngs(self.seed, *position)
        image = augment(self.transform, image, where)
        return (image, label) if self.labeled else image

    def _label(self, sample: dict) -> int:
        """The sample's ``cls`` as a class index; a ValueError if missing, not an integer or not
        one of the shard set's classes."""
        if "cls" not in sample:
            raise ValueError("no 'cls' label")
        label = int(sample["cls"])
        if self.classes and not 0 <= label < len(self.classes):
            raise ValueError(f"label {label} is not one of the {len(self.classes)} classes of shards.json")
        return label

    def _count_skip(self, message: str) -> None:
        with self._skipped.get_lock():
            self._skipped.value += 1
        warnings.warn(message, stacklevel=3)


def _where(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def write_shards(source: str | os.PathLike, destination: str | os.PathLike, prefix: str = "shard",
                 max_count: int = 10_000, max_size: float = 1e9, labeled: bool | None = None,
                 progress: tqdm | None = None, shuffle_seed: int | None = 0) -> dict:
    """Pack the images of ``source`` into ``destination/PREFIX-000000.tar`` … with their original
    bytes (no re-encoding), plus ``shards.json``. An ImageFolder tree (sub-folders only) keeps
    its labels as ``cls`` (``labeled=None``: decide by the layout). Images are packed in an
    order shuffled with ``shuffle_seed`` (None: sorted by path), so every shard mixes the
    classes; a file that is not an image Pillow can open is skipped and reported. ``progress``
    (a tqdm bar) gets the image count and advances per image.

    The whole set is written into a fresh hidden folder inside ``destination`` first; an
    interruption or error there removes that folder and leaves ``destination`` as it was. A
    complete set is then moved in: the index first (with each shard's size and sample count),
    then the shards, so a set cut short while moving never passes for a whole one (readers
    compare each shard with the index: :func:`check_against_index`). Returns the summary
    stored in ``shards.json``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", prefix):
        raise ValueError(f"--prefix {prefix!r}: use letters, digits, '.', '_' and '-' only (no path separators, "
                         f"no '%' or braces): it names files inside the destination")
    source, destination = Path(source), Path(destination)
    files = find_images(source)
    in_classes, labels, classes = class_labels(source, files)
    if labeled is None:
        labeled = bool(classes) and len(in_classes) == len(files)
    if labeled:
        files = in_classes
    if progress is not None:
        progress.reset(total=len(files))
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=destination))
    try:
        shards, skipped = _pack(files, labels if labeled else None, source, staging / f"{prefix}-%06d.tar",
                                max_count, max_size, shuffle_seed, progress)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)     # our own fresh folder: nothing else is in it
        if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
            raise OSError(f"writing shards into {destination} failed ({error.strerror or error}); "
                          f"{destination} is unchanged") from None
        raise
    if not shards:
        staging.rmdir()
        raise DataError(f"no image under {source} could be read; no shard written")
    summary = {"source": str(source), "shards": shards, "classes": classes if labeled else [],
               "samples": sum(shard["samples"] for shard in shards), "skipped": skipped}
    atomic_write(destination / SHARD_INDEX, lambda file: file.write(json.dumps(summary, indent=1).encode()))
    for shard in shards:
        os.replace(staging / shard["name"], destination / shard["name"])
    staging.rmdir()
    return summary


STAGING_PREFIX = ".fcmae-shards-"


def _pack(files: Sequence[Path], labels: Sequence[int] | None, source: Path, pattern: Path, max_count: int,
          max_size: float, shuffle_seed: int | None, progress: tqdm | None) -> tuple[list[dict], list[str]]:
    """Write ``files`` as shards named by ``pattern`` (in a fresh folder); returns (one entry
    per complete shard: name, samples, bytes; the files skipped, with the reason). A shard is
    written as ``NAME.partial`` and renamed only when complete; an exception leaves the
    shard in progress unpublished."""
    shards: list[dict] = []
    skipped: list[str] = []
    handles: dict[str, object] = {}

    def open_partial(name: str):
        # a new file, never through a link planted there: O_EXCL refuses any existing name
        descriptor = os.open(f"{name}.partial", os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                             0o666)
        handles[name] = os.fdopen(descriptor, "wb")
        return handles[name]

    def publish(name: str) -> None:
        handle = handles.pop(name)
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        if writer.count == 0:                 # nothing readable was written to it
            Path(f"{name}.partial").unlink()
            return
        os.replace(f"{name}.partial", name)
        shards.append({"name": Path(name).name, "samples": writer.count, "bytes": Path(name).stat().st_size})

    writer = _webdataset().ShardWriter(str(pattern), maxcount=max_count, maxsize=max_size, opener=open_partial,
                                       post=publish, verbose=0)
    order = list(range(len(files)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    try:
        for index in order:
            path = files[index]
            try:
                data = path.read_bytes()
                with Image.open(io.BytesIO(data)) as image:   # headers only: is it an image at all?
                    image.verify()
            except READ_ERRORS as error:
                skipped.append(f"{path}: {getattr(error, 'strerror', None) or error}")
            else:
                sample = {"__key__": f"{index:09d}", path.suffix.lower().lstrip("."): data,
                          "path": str(path.relative_to(source))}
                if labels is not None:
                    sample["cls"] = str(labels[index])
                writer.write(sample)
            if progress is not None:
                progress.update()
    except BaseException:
        writer.post = None                    # the shard in progress is never published
        for handle in handles.values():
            handle.close()
        raise
    writer.close()
    return shards, skipped
