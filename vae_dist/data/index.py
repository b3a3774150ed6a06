"""`vae-dist index`: manifest.json and DALI `.idx` files for WebDataset tars another tool wrote
(img2dataset's `00000.tar` ... holding `KEY.jpg`, `KEY.json`, `KEY.txt`), without repacking.

Each tar is read once (`scan_tar`: its members' offsets and sizes, the label members' text, and
its sha256 in the same pass). A sample's image is its member by extension (IMAGE_EXTS); a sample
without one, or whose key the `.idx` format cannot carry (whitespace), is skipped and counted.
Labels (`--label`):
  auto     cls where any sample has a `.cls` member, else none (the default)
  cls      the `.cls` member's text
  json:KEY the value of KEY in the `.json` member
  none     every label -1
Integer values are the labels as they are; where any value is not an integer, every value is
a class name and the labels number the sorted names (the manifest's `classes`). A sample
without the member or the key gets -1. The labels live in a side file per shard and split
(`SHARD.SPLIT.labels`, int32 little-endian, one per .idx line), its sha256 in the manifest.

Val: `--val-shards N` (the last N tars, whole) or `--val-fraction F --seed S` (a seeded share of
the samples: each tar then has a train and a val .idx, each listing its own samples); the
default is a fraction of 0.05, as pack's. The index (`SHARD.SPLIT.idx`, `SHARD.SPLIT.labels`,
manifest.json) goes beside the tars, or into `--out DIR` when the source cannot be written:
that manifest's `shard_base` says where the tars are. The manifest says `"resize": true`: the
images vary in size, and every loader resizes (shorter side to S) and centre-crops them at decode.
The tars may be at a URL (s3://, http(s)://): vae_dist.data.index_url fetches each once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vae_dist.data.pack import Progress
from vae_dist.data.shards import (
    FORMAT_INDEXED,
    IMAGE_EXTS,
    MANIFEST,
    image_ext,
    is_indexed,
    split_name,
    write_json_atomic,
)
from vae_dist.errors import DataError, UserError, counted
from vae_dist.files import output_dir, probe_writable, write_atomic

DEFAULT_VAL_FRACTION = 0.05
_LABEL_MEMBERS = ("cls", "json")  # the members whose text a label may come from (small: read whole)


@dataclass
class IndexOptions:
    image_size: int = 64
    label: str = "auto"  # auto | none | cls | json:KEY
    val_shards: int | None = None
    val_fraction: float | None = None  # neither given: DEFAULT_VAL_FRACTION
    seed: int = 0


@dataclass
class Sample:
    key: str
    parts: dict[str, tuple[int, int, str]]  # ext -> (data offset, size, member name), in tar order
    texts: dict[str, bytes] = field(default_factory=dict)  # cls / json members' bytes


@dataclass
class TarScan:
    name: str
    bytes: int
    sha256: str
    samples: list[Sample]


class _HashingReader:
    """A file read front to back that hashes what passes (the tar's sha256 in the scanning pass)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def read(self, size=-1):
        data = self.f.read(size)
        self.h.update(data)
        self.n += len(data)
        return data


def scan_tar(path: str | Path) -> TarScan:
    """One local tar's samples (their members grouped by key, as wds2idx groups consecutive
    members), the label members' bytes, its size and sha256, read in one streaming pass.
    Raises tarfile.TarError / OSError / EOFError for a damaged tar. (A tar at a URL is
    downloaded first, and this reads the local copy: index_url.)"""
    samples: list[Sample] = []
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    continue  # as wds2idx: only files are components
                key, ext = split_name(member.name)
                if not key or key.endswith("/") or not ext:
                    continue
                if not samples or samples[-1].key != key:
                    samples.append(Sample(key, {}))
                samples[-1].parts[ext] = (member.offset_data, member.size, member.name)
                if ext in _LABEL_MEMBERS and member.size <= 1 << 20:
                    samples[-1].texts[ext] = tar.extractfile(member).read()
        while reader.read(1 << 20):  # the end-of-archive blocks and padding: in the digest too
            pass
    return TarScan(Path(path).name, reader.n, reader.h.hexdigest(), samples)


def index_line(sample: Sample) -> str:
    """The sample's `.idx` line, as DALI's wds2idx writes it: `ext offset size name` per component;
    never a `label` one: that name means pack's 4-byte int32 to the loaders, and a foreign set's
    labels come from --label (a side file) or are -1."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, (offset, size, name) in sample.parts.items()
                    if ext != "label")


# -- labels --------------------------------------------------------------------------------
def parse_label_option(label: str) -> tuple[str, str | None]:
    """('auto' | 'none' | 'cls' | 'json', the json key)."""
    kind, _, key = label.partition(":")
    if label in ("auto", "none", "cls") or (kind == "json" and key):
        return kind, key or None
    raise UserError(f"--label must be auto, none, cls or json:KEY, got {label!r}")


def _raw_label(sample: Sample, kind: str, key: str | None):
    """The sample's label value as its member holds it (int or str), or None where it holds none."""
    if kind == "cls":
        text = sample.texts.get("cls")
        return None if text is None else text.decode(errors="replace").strip() or None
    try:
        value = json.loads(sample.texts["json"]).get(key)
    except (KeyError, ValueError, AttributeError):  # no json, not JSON, not an object
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return value


def _as_int(value) -> int | None:
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        return None


def resolve_labels(samples: list[Sample], label: str) -> tuple[str, np.ndarray, list[str] | None]:
    """(the label rule used, one label per sample (-1: none), the class names where the values
    are names). An unknown json key or a cls that no sample has is one line."""
    kind, key = parse_label_option(label)
    if kind == "auto":
        kind = "cls" if any("cls" in s.parts for s in samples) else "none"
    if kind == "none":
        return "none", np.full(len(samples), -1, dtype=np.int32), None
    raw = [_raw_label(s, kind, key) for s in samples]
    found = [v for v in raw if v is not None]
    rule = "cls" if kind == "cls" else f"json:{key}"
    if not found:
        if kind == "cls":
            raise DataError("--label cls: no sample has a .cls member holding a label (--label none: no labels)")
        seen = sorted({k for s in samples[:1000] for k in _json_keys(s)})
        raise DataError(f"--label json:{key}: no sample's .json member holds the key {key!r} "
                        f"(keys there: {', '.join(seen[:12]) or 'none: no .json members'})")
    ints = [_as_int(v) for v in found]
    if all(i is not None and i >= 0 for i in ints):
        return rule, np.array([-1 if v is None else _as_int(v) for v in raw], dtype=np.int32), None
    names = sorted({str(v) for v in found})  # names (or negative numbers): numbered in sorted order
    number = {name: i for i, name in enumerate(names)}
    return rule, np.array([-1 if v is None else number[str(v)] for v in raw], dtype=np.int32), names


def _json_keys(sample: Sample) -> list[str]:
    try:
        doc = json.loads(sample.texts["json"])
    except (KeyError, ValueError):
        return []
    return [str(k) for k in doc] if isinstance(doc, dict) else []


# -- the val split ---------------------------------------------------------------------------
def check_options(opts: IndexOptions) -> None:
    from vae_dist.data.pack import check_image_size

    check_image_size(opts.image_size)
    parse_label_option(opts.label)
    if opts.val_shards is not None and opts.val_fraction is not None:
        raise UserError("give --val-shards or --val-fraction, not both")
    if opts.val_shards is not None and opts.val_shards < 0:
        raise UserError(f"--val-shards must be 0 or more, got {opts.val_shards}")
    if opts.val_fraction is not None and not 0 <= opts.val_fraction < 1:
        raise UserError(f"--val-fraction must be at least 0 and below 1, got {opts.val_fraction}")


def val_mask(sizes: list[int], opts: IndexOptions) -> list[np.ndarray]:
    """Per tar, which of its (kept) samples are val: the last `val_shards` tars whole, or a seeded
    `val_fraction` of all the samples (exactly round(F x N) of them, the same for the same seed)."""
    if opts.val_shards is not None:
        if opts.val_shards >= len(sizes):
            raise UserError(f"--val-shards {opts.val_shards} leaves no train shard: the source holds "
                            f"{counted(len(sizes), 'usable tar')}")
        return [np.full(n, t >= len(sizes) - opts.val_shards) for t, n in enumerate(sizes)]
    fraction = DEFAULT_VAL_FRACTION if opts.val_fraction is None else opts.val_fraction
    total = sum(sizes)
    val = np.zeros(total, dtype=bool)
    val[np.random.default_rng(opts.seed).permutation(total)[:round(fraction * total)]] = True
    return np.split(val, np.cumsum(sizes)[:-1])


# -- the command -----------------------------------------------------------------------------
def list_tars(src: Path) -> list[Path]:
    if not src.is_dir():
        raise DataError(f"shard folder not found: {src}")
    tars = sorted(p for p in src.iterdir() if p.suffix == ".tar" and p.is_file())
    if not tars:
        raise DataError(f"no .tar files in {src}: `vae-dist index` describes a folder of WebDataset tars "
                        f"(e.g. img2dataset's 00000.tar ...)")
    return tars


def check_out(src: Path | None, out: Path | None) -> Path:
    """The folder the index goes to: `out`, else the source's own (which must be writable); a
    manifest.json there that `pack` wrote is not replaced."""
    if out is None:
        try:
            probe_writable(src)
        except OSError:
            raise UserError(f"cannot write into {src} (read-only?): give --out DIR, a folder for the index "
                            f"(its manifest.json then says where the tars are)") from None
        target = src
    else:
        target = output_dir(out, "index output folder")
    manifest = target / MANIFEST
    if manifest.is_file():
        try:
            ours = is_indexed(json.loads(manifest.read_text()))
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(f"{manifest} is not one `vae-dist index` wrote (a packed set's, or another tool's): "
                            f"index into another folder with --out DIR")
    return target


def index_shards(src: str | Path, out: str | Path | None = None, opts: IndexOptions | None = None, *,
                 retries: int = 5, backoff: float = 0.5, jobs: int = 4) -> dict:
    """Describes the tars in the folder `src` (manifest.json, `.idx` and label files, in `out` or
    beside them); returns the manifest. Nothing of the tars is changed. `src` may be a URL
    (index_url: `retries` and `backoff` are its requests', `jobs` the tars fetched at a time)."""
    from vae_dist.data.remote import is_url

    if is_url(str(src)):
        from vae_dist.data.index_url import index_url

        return index_url(str(src), out, opts, retries=retries, backoff=backoff, jobs=jobs)
    opts = opts or IndexOptions()
    check_options(opts)
    src = Path(src)
    tars = list_tars(src)
    target = check_out(src, Path(out) if out is not None else None)
    t0 = time.perf_counter()
    scans, damaged = scan_all([tar.name for tar in tars], lambda name: scan_tar(src / name))
    shard_base = _shard_base(src, target) if target.resolve() != src.resolve() else None
    return write_index(target, scans, damaged, opts, source=str(src.resolve()), shard_base=shard_base, t0=t0)


def scan_all(names: list[str], scan_one, jobs: int = 1) -> tuple[list[TarScan], list[dict]]:
    """(scan_one(name) of each tar that reads, in `names`' order; {"file", "reason"} of each that
    does not: a damaged tar is skipped, said on stderr and recorded, not the end of the run).
    `jobs` > 1: that many on threads at once (a URL's tars: fetched while others are scanned)."""

    def attempt(name: str) -> TarScan | str:
        try:
            return scan_one(name)
        except (tarfile.TarError, OSError, EOFError) as e:
            return f"unreadable tar ({str(e) or type(e).__name__})"

    def read(seconds: float) -> str:  # what the progress line adds: the tars' samples and rate so far
        return (f"{sum(len(s.samples) for s in scans)} samples, "
                f"{sum(s.bytes for s in scans) / 1e6 / max(seconds, 1e-9):.0f} MB/s")

    scans, damaged = [], []
    pool = ThreadPoolExecutor(jobs) if jobs > 1 else None
    with Progress(len(names), f"index {counted(len(names), 'tar')}", unit="tar", note=read) as progress:
        try:
            for name, scan in zip(names, pool.map(attempt, names) if pool else map(attempt, names)):
                if isinstance(scan, str):
                    damaged.append({"file": name, "reason": scan})
                    print(f"index: skipped {name}: {scan}", file=sys.stderr, flush=True)
                else:
                    scans.append(scan)
                progress.update()
        finally:
            if pool is not None:  # a failure (one line) stops the tars not yet begun; those under way end
                pool.shutdown(wait=True, cancel_futures=True)
    return scans, damaged


def write_index(target: Path, scans: list[TarScan], damaged: list[dict], opts: IndexOptions, *, source: str,
                shard_base: str | None, t0: float) -> dict:
    """The index of the scanned tars in the folder `target`: each tar's .idx and label files per
    split, then manifest.json (`shard_base`: where the tars are, where not beside it); returns it."""
    skipped: Counter = Counter()
    kept = [[s for s in scan.samples if _usable(s, skipped)] for scan in scans]
    scans, kept = [s for s, k in zip(scans, kept) if k], [k for k in kept if k]  # a tar with no image: no shard
    if not kept:
        raise DataError(f"no usable samples in {source}: " + (f"{counted(len(damaged), 'damaged tar')}, " if damaged
                                                               else "") + _skipped_text(skipped, "no samples"))
    rule, labels, classes = resolve_labels([s for k in kept for s in k], opts.label)
    labels = np.split(labels, np.cumsum([len(k) for k in kept])[:-1])
    val = val_mask([len(k) for k in kept], opts)
    splits: dict[str, dict] = {"train": {"count": 0, "shards": []}, "val": {"count": 0, "shards": []}}
    for scan, samples, shard_labels, is_val in zip(scans, kept, labels, val):
        for split, mine in (("train", ~is_val), ("val", is_val)):
            if mine.any():
                picked = [s for s, m in zip(samples, mine) if m]
                record = _write_shard_index(target, scan, split, picked, shard_labels[mine], rule != "none")
                splits[split]["shards"].append(record)
                splits[split]["count"] += record["count"]
    manifest = {
        "format": FORMAT_INDEXED,
        "image_size": opts.image_size,
        "resize": True,
        **({"shard_base": shard_base} if shard_base is not None else {}),
        "source": source,
        "label": rule,
        **({"classes": classes} if classes else {}),
        "val": ({"shards": opts.val_shards} if opts.val_shards is not None else
                {"fraction": DEFAULT_VAL_FRACTION if opts.val_fraction is None else opts.val_fraction,
                 "seed": opts.seed}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "splits": {name: info for name, info in splits.items() if info["count"]},
        "skipped_tars": damaged,
        "skipped_samples": dict(skipped),
        "index_seconds": round(time.perf_counter() - t0, 3),
    }
    _remove_stale(target, manifest)
    write_json_atomic(target / MANIFEST, manifest)
    return manifest


def _usable(sample: Sample, skipped: Counter) -> bool:
    if image_ext(sample.parts) is None:
        skipped["with no image member"] += 1
        return False
    if any(c.isspace() for _, _, name in sample.parts.values() for c in name):  # .idx fields split on whitespace
        skipped["with whitespace in the key (an .idx line cannot carry it)"] += 1
        return False
    return True


def _skipped_text(skipped: Counter, none: str) -> str:
    return ", ".join(f"{counted(n, 'sample')} {why}" for why, n in skipped.most_common()) or none


def _shard_base(src: Path, target: Path) -> str:
    """Where the tars are, as the manifest in `target` records it: relative where the two folders
    are near (two levels up at most: the pair moves together), else absolute."""
    rel = os.path.relpath(src.resolve(), target.resolve())
    return rel if Path(rel).parts[:3].count(os.pardir) < 3 else str(src.resolve())


def _write_shard_index(target: Path, scan: TarScan, split: str, samples: list[Sample], labels: np.ndarray,
                       with_labels: bool) -> dict:
    stem = scan.name.removesuffix(".tar")
    index = (f"v1.2 {len(samples)}\n" + "".join(index_line(s) + "\n" for s in samples)).encode()
    idx_name = f"{stem}.{split}.idx"
    write_atomic(target / idx_name, index)
    record = {"file": scan.name, "index": idx_name, "count": len(samples), "bytes": scan.bytes,
              "sha256": scan.sha256, "index_sha256": hashlib.sha256(index).hexdigest()}
    if with_labels:
        data = labels.astype("<i4").tobytes()
        record["labels"] = f"{stem}.{split}.labels"
        record["labels_sha256"] = hashlib.sha256(data).hexdigest()
        write_atomic(target / record["labels"], data)
    return record


def _remove_stale(target: Path, manifest: dict) -> None:
    """The index files an earlier index of this folder wrote that this one does not (another val
    split, a tar gone): removed, so the folder holds one index. Only names that manifest listed."""
    try:
        old = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return
    if not is_indexed(old):
        return
    for name in stale_index_files(old, manifest):
        (target / name).unlink(missing_ok=True)


def index_files(manifest: dict) -> set[str]:
    """The `.idx` and label files an index's manifest names."""
    return {shard[key] for info in manifest.get("splits", {}).values() for shard in info.get("shards", [])
            for key in ("index", "labels") if isinstance(shard.get(key), str)}


def stale_index_files(old: dict, new: dict) -> list[str]:
    """The index files of the `old` manifest that the `new` one does not name, to remove: only
    what an index writes (a `.idx` or `.labels` file of the folder itself), whatever the old lists."""
    return sorted(name for name in index_files(old) - index_files(new)
                  if "/" not in name and name.endswith((".idx", ".labels")))


def summary(manifest: dict) -> str:
    size = manifest["image_size"]
    lines = []
    for split, info in manifest["splits"].items():
        tars = len({s["file"] for s in info["shards"]})
        lines.append(f"{split}: {counted(info['count'], 'sample')} in {counted(tars, 'tar')}")
    classes = manifest.get("classes")
    lines.append(f"labels: {manifest['label']}" + (f" ({counted(len(classes), 'class', 'classes')} by name)"
                                                   if classes else ""))
    lines.append(f"images: any size, resized and centre-cropped to {size}x{size} at decode")
    skipped = manifest.get("skipped_samples", {})
    lines.append("skipped: " + (_skipped_text(Counter(skipped), "") or "none")
                 + (f"; {counted(len(manifest['skipped_tars']), 'damaged tar')}: "
                    + ", ".join(d["file"] for d in manifest["skipped_tars"]) if manifest.get("skipped_tars") else ""))
    if "shard_base" in manifest:
        from vae_dist.data.remote import is_url

        base = manifest["shard_base"]
        lines.append(f"tars read from {base}" + ("" if os.path.isabs(base) or is_url(base) else
                                                 " (shard_base, relative to the index folder)"))
    lines.append(f"indexed in {manifest['index_seconds']:.1f} s")
    return "\n".join(lines)


__all__ = ["IMAGE_EXTS", "IndexOptions", "index_shards", "scan_tar", "summary", "index_line"]
