"""`vae-dist pack`: Tiny ImageNet or any folder of images (a folder or a zip) -> shuffled
WebDataset shards + manifest.json. The layouts it reads are data/sources.py's.

Every image is decoded once in a worker process (all cores), made RGB SxS, and written in
a globally shuffled order. Unreadable files go to manifest['rejected'] with the reason.
Output is staged in a hidden folder and swapped in at the end, so a crash never leaves a
half-written shard that looks complete, and packing again replaces the old result whole.

OUT is the user's folder: pack writes into an empty one or one an earlier pack wrote, and
replaces only the files that pack's manifest.json names; a folder holding anything else is
refused before any work. SIGTERM stops a pack as SIGINT does (the staging folder removed,
OUT as it was); the staging folder of a pack that was killed outright is removed by the next
pack into that folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vae_dist.data import available_cores
from vae_dist.data.images import to_shard_jpeg
from vae_dist.data.shards import MANIFEST, ShardWriter, shard_name, write_json_atomic
from vae_dist.data.sources import SPLIT_FOLDERS, list_source, open_source
from vae_dist.data.tree import FileTree, Record
from vae_dist.errors import DataError, Terminated, UserError, counted
from vae_dist.files import fsync_dir, output_dir, pid_alive

# the VAE's stride-2 convs halve the image 4 times (the seed's; more layers need more)
SIZE_STEP, MIN_SIZE, MAX_SIZE = 16, 16, 512
FORMAT = "vae-dist-shards/1"  # manifest.json's "format": what tells a folder of ours
STAGING = ".pack-staging-"  # + host-pid: a pack's work folder inside OUT
# the names a swap touches (the old files and the new), written before it starts and removed
# after it ends: a pack killed halfway through a swap leaves it, and the next pack knows them
SWAP_RECORD = ".pack-swap.json"
_SHARD_FILE = re.compile(rf"({'|'.join(SPLIT_FOLDERS)})-\d{{6}}\.(tar|idx)")
# what a folder for shards may hold besides them: a description (the repository's own
# shards/README.md) and hidden files (.gitignore, .gitkeep, .DS_Store); pack never touches them
_LEFT_ALONE = re.compile(r"README(\.\w+)?|\..*", re.IGNORECASE)


@dataclass
class PackOptions:
    shard_size: int = 5000
    workers: int = 0  # 0: all cores
    seed: int = 0
    splits: tuple[str, ...] = ("train", "val")
    image_size: int = 64
    quality: int = 95
    keep_source: bool = True  # keep bytes that already are RGB SxS baseline JPEGs
    layout: str = "auto"  # auto | tinyimagenet | classes | flat (data/sources.py)
    val_fraction: float | None = None  # without a val folder: this share of the images is val; none: 0.05


# -- worker side: one tree per process (a zip handle must not be shared across fork) -------
_TREE: FileTree | None = None
_OPTS: PackOptions | None = None


def _init_worker(location: str, root: str, opts: PackOptions) -> None:
    global _TREE, _OPTS
    # the main process alone handles the stop signals; the pool's exit ends the workers with a
    # SIGTERM, which must end them quietly (they start with both signals blocked: see _pool)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    _TREE, _OPTS = FileTree(location, root), opts


def _convert(record: Record):
    try:
        data = _TREE.read_bytes(record.path)
    except OSError as e:
        return record, None, f"unreadable file ({e})", {}
    jpeg, reason, changes = to_shard_jpeg(data, _OPTS.image_size, _OPTS.quality, _OPTS.keep_source)
    return record, jpeg, reason, changes


def check_image_size(size: int) -> None:
    if not (size % SIZE_STEP == 0 and MIN_SIZE <= size <= MAX_SIZE):
        raise DataError(f"--image-size must be a multiple of {SIZE_STEP} from {MIN_SIZE} to {MAX_SIZE} "
                        f"(the VAE halves it 4 times), got {size}")


def check_options(opts: PackOptions) -> None:
    check_image_size(opts.image_size)
    for name, value, ok, must in (("--shard-size", opts.shard_size, opts.shard_size > 0, "positive"),
                                  ("--workers", opts.workers, opts.workers >= 0, "0 (all cores) or more"),
                                  ("--quality", opts.quality, 1 <= opts.quality <= 100, "in 1..100")):
        if not ok:
            raise DataError(f"{name} must be {must}, got {value}")


def pack(src_path: str | Path, out_dir: str | Path, opts: PackOptions | None = None) -> dict:
    opts = opts or PackOptions()
    check_options(opts)
    check_output_folder(Path(out_dir))  # before any work
    with _sigterm_raises():
        t_list = time.perf_counter()
        src, layout = open_source(src_path, opts.layout, exclude=out_dir)  # OUT inside SRC is not read
        try:
            listing = list_source(src, layout, opts.splits, opts.val_fraction, opts.seed)
            list_seconds = time.perf_counter() - t_list
            out_dir = output_dir(out_dir, "pack output folder")  # once the source is known good
            remove_stale_staging(out_dir)
            staging = out_dir / f"{STAGING}{socket.gethostname()}-{os.getpid()}"
            try:
                manifest, old = _stage(src, listing, src_path, staging, out_dir, opts, list_seconds)
                _swap_in(staging, out_dir, old)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            src.close()
    return manifest


def _stage(src: FileTree, listing, src_path, staging: Path, out_dir: Path, opts: PackOptions,
           list_seconds: float) -> tuple[dict, set[str]]:
    """Packs into `staging` with its manifest, and records the swap to come; returns (the
    manifest, the names of the earlier pack's files it replaces). Until the swap OUT is as it
    was, so a full disk or a SIGTERM in here ends in one line that says so."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        manifest = _pack_listing(src, listing, src_path, staging, opts)
        manifest["list_seconds"] = round(list_seconds, 3)
        write_json_atomic(staging / MANIFEST, manifest)
        old = previous_pack_files(out_dir)
        write_json_atomic(out_dir / SWAP_RECORD, {"files": sorted(old | _names(staging))})
        return manifest, old
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _disk_full(out_dir, staging) from None
    except Terminated:
        raise Terminated(f"pack stopped by SIGTERM: its staging folder is removed, {out_dir} holds what it "
                         "held before") from None


# -- OUT: what pack may replace there ------------------------------------------------------
def previous_pack_files(out_dir: Path) -> set[str]:
    """The names of the files an earlier pack wrote into `out_dir`, which packing again replaces:
    manifest.json and the shards it names, and those of a swap that did not finish. Only shard
    names directly in the folder count, whatever a damaged or edited manifest says."""
    names = set()
    for record, files in ((MANIFEST, _manifest_files), (SWAP_RECORD, lambda doc: doc.get("files"))):
        try:
            doc = json.loads((out_dir / record).read_text())
            if record == MANIFEST and not _written_by_pack(doc):
                continue  # a manifest.json of something else (every pack writes its format): the user's
            listed = files(doc)
        except (OSError, ValueError, AttributeError, TypeError):
            continue  # one that does not parse is not known to be pack's either: left alone, and refused
        names.add(record)
        names.update(n for n in listed or [] if isinstance(n, str) and _SHARD_FILE.fullmatch(n))
    return names


def _written_by_pack(manifest) -> bool:
    """Whether a parsed manifest.json is one `vae-dist pack` wrote (its format, any version)."""
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(FORMAT.split("/")[0] + "/")


def _manifest_files(manifest: dict) -> list:
    return [shard.get(key) for info in manifest.get("splits", {}).values()
            for shard in info.get("shards", []) for key in ("file", "index")]


def check_output_folder(out_dir: Path) -> None:
    """Refuses an output folder holding anything pack did not write (it may be empty): pack
    replaces only the files of an earlier pack, and a folder of other things is the wrong one."""
    if not out_dir.is_dir():
        return  # made later (or a file in the way: output_dir says so)
    ours = previous_pack_files(out_dir)
    foreign = []
    for entry in sorted(out_dir.iterdir()):
        name = entry.name
        if entry.is_dir() and not entry.is_symlink():
            if not name.startswith(STAGING):
                foreign.append(name + "/")
        elif name not in ours and name != MANIFEST + ".partial" and not _LEFT_ALONE.fullmatch(name):
            # (a manifest.json.partial is what a pack killed while writing it left)
            foreign.append(name)
    if foreign:
        folders = sum(name.endswith("/") for name in foreign)
        what = " and ".join(counted(n, noun) for n, noun in ((len(foreign) - folders, "file"), (folders, "folder")) if n)
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"pack output folder {out_dir} holds {what} no earlier pack wrote ({shown}): pack writes into "
                        f"an empty folder, or into one an earlier pack wrote (replacing the files its manifest.json "
                        f"names); choose another folder, or move them out")


def remove_stale_staging(out_dir: Path) -> None:
    """Removes the staging folders that packs killed outright (SIGKILL, a crash) left in
    `out_dir`: those of this host whose process is gone. A live pack's is left alone, and
    so is every other host's (on a shared filesystem its process cannot be seen from here)."""
    host = socket.gethostname()
    for folder in out_dir.glob(STAGING + "*"):
        owner, _, pid = folder.name.removeprefix(STAGING).rpartition("-")
        if pid.isdigit() and owner in ("", host) and not pid_alive(int(pid)):  # "": an older pack's name
            shutil.rmtree(folder, ignore_errors=True)


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _disk_full(out_dir: Path, staging: Path) -> UserError:
    """The one line of a pack that ran out of space, once its staging folder is removed."""
    written = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) if staging.is_dir() else 0
    shutil.rmtree(staging, ignore_errors=True)
    free = shutil.disk_usage(out_dir).free
    kept = f"the previous shards in {out_dir} are untouched" if previous_pack_files(out_dir) - {SWAP_RECORD} \
        else f"nothing of it is left in {out_dir}"
    return UserError(f"no space left on the device of pack output folder {out_dir}: {_size(free)} free there once the "
                     f"{_size(written)} this pack had written were removed; {kept}")


def _size(n: int) -> str:
    """A size in the unit that reads best: 24 KB, 3.5 MB, 120.0 GB."""
    return f"{n / 1e3:.0f} KB" if n < 1e6 else f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.1f} GB"


# -- signals -------------------------------------------------------------------------------
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated in this (the main) process, as SIGINT raises KeyboardInterrupt,
    so the finally blocks remove the staging folder and the pool's exit stops the workers. Left
    as it is outside the main thread, where Python sets no handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _stop_signals_held():
    """Holds SIGTERM and SIGINT until the block ends: they arrive after it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _pool(ctx, workers: int, initargs: tuple):
    """The worker pool, its processes started with the stop signals held, so that none of them
    meets one before _init_worker has made them quiet there."""
    with _stop_signals_held():
        return ctx.Pool(workers, initializer=_init_worker, initargs=initargs)


def _pack_listing(src: FileTree, listing, src_path, staging: Path, opts: PackOptions) -> dict:
    """Every split of `listing` into shards in `staging`; returns the manifest."""
    rejected = [{"path": p, "reason": "unsafe path in archive (absolute or '..')"} for p in src.unsafe_members()]
    rejected += [{"path": p, "reason": why} for p, why in sorted(src.refused.items())]  # links, OUT inside SRC
    rejected += listing.rejected
    manifest = {
        "format": FORMAT,
        "image_size": opts.image_size,
        "layout": listing.layout,
        "classes": listing.classes,
        "words": listing.words,
        "source": str(Path(src_path).resolve()),
        "seed": opts.seed,
        "quality": opts.quality,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "splits": {},
        "rejected": rejected,
    }
    splits = {}
    for split, records in listing.splits.items():
        random.Random(f"{opts.seed}-{split}").shuffle(records)  # the global shuffle
        # unique keys by construction: the position in the split, then the readable stem
        # (one name in two classes, or x.y.JPEG beside x_y.JPEG, stay two samples)
        splits[split] = [dataclasses.replace(r, key=f"{i:07d}_{r.key}") for i, r in enumerate(records)]
    total = sum(map(len, splits.values()))
    workers = opts.workers or available_cores()
    t0 = time.perf_counter()
    ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
    with _pool(ctx, workers, (str(src_path), src.root, opts)) as pool, \
            Progress(total, f"pack {counted(total, 'image')} on {counted(workers, 'process', 'processes')}") as bar:
        for split, records in splits.items():
            manifest["splits"][split] = _pack_split(pool, records, split, staging, opts, rejected, bar)
    seconds = time.perf_counter() - t0
    if not any(info["count"] for info in manifest["splits"].values()):  # the old shards stay as they are
        first = f" (the first: {rejected[0]['path']}: {rejected[0]['reason']})" if rejected else ""
        raise DataError(f"no images in {src_path}: none of its {counted(len(rejected), 'file')} packs{first}; "
                        f"pack reads Tiny ImageNet, a folder of class folders, or a folder of images")
    manifest.update(pack_seconds=round(seconds, 3), pack_img_per_s=round(total / seconds, 1), pack_workers=workers)
    return manifest


class Progress:
    """A long pass's progress (pack's images, index's tars): on a terminal a tqdm bar (count,
    rate, ETA); elsewhere (a log file, a SLURM job) one line every `every` seconds, so a long run
    still says where it is. `note(seconds)`: more words for that line (index: samples, MB/s)."""

    def __init__(self, total: int, desc: str, every: float = 30.0, unit: str = "img", note=None):
        self.total, self.desc, self.every, self.done = total, desc, every, 0
        self.unit, self.note = unit, note
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():  # imported here: a log (the GPU check, a SLURM job) needs no tqdm
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.t0)
            left = round((self.total - self.done) / rate)
            eta = f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}" if left >= 3600 else f"{left // 60:02d}:{left % 60:02d}"
            shown = f"{rate:.1f}" if rate < 10 else f"{rate:.0f}"  # index's tars may come slower than one a second
            note = f", {self.note(now - self.t0)}" if self.note else ""
            print(f"{self.desc}: {self.done}/{self.total} ({self.done / self.total:.0%}), {shown} {self.unit}/s, "
                  f"ETA {eta}{note}", file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _pack_split(pool, records: list[Record], split: str, staging: Path, opts: PackOptions, rejected: list,
                bar: Progress) -> dict:
    shards, changes = [], Counter()
    writer: ShardWriter | None = None
    for record, jpeg, reason, change in pool.imap(_convert, records, chunksize=64):
        bar.update()
        if jpeg is None:
            rejected.append({"path": record.path, "reason": reason})
            continue
        changes.update(change)
        if writer is None:
            writer = ShardWriter(staging / shard_name(split, len(shards)))
        writer.write(record.key, jpeg, record.label)
        if writer.count == opts.shard_size:
            shards.append(writer.close())
            writer = None
    if writer is not None:
        shards.append(writer.close())
    return {"count": sum(s["count"] for s in shards), "shards": shards, "converted": dict(changes)}


def _swap_in(staging: Path, out_dir: Path, old: set[str]) -> None:
    """Replaces the previous pack in out_dir (the files `old` names, nothing else) by the staged
    one: the old manifest goes first (so a crash in between leaves a folder that `verify` and
    training reject), the new one last. SWAP_RECORD names both sets until the swap is over; the
    stop signals wait for its end (it takes milliseconds)."""
    with _stop_signals_held():
        (out_dir / MANIFEST).unlink(missing_ok=True)
        for name in sorted(old - {MANIFEST, SWAP_RECORD}):
            (out_dir / name).unlink(missing_ok=True)
        for name in sorted(_names(staging) - {MANIFEST}):
            os.replace(staging / name, out_dir / name)
        os.replace(staging / MANIFEST, out_dir / MANIFEST)
        fsync_dir(out_dir)
        (out_dir / SWAP_RECORD).unlink()


def summary(manifest: dict) -> str:
    layout = manifest.get("layout", {})
    classes = len(manifest.get("classes", []))
    lines = [f"layout: {layout.get('name', '?')} ({counted(classes, 'class', 'classes') if classes else 'no classes'}; "
             f"val: {layout.get('val', '?')}), images {manifest['image_size']}x{manifest['image_size']}"]
    for split, info in manifest["splits"].items():
        conv = ", ".join(f"{k} {v}" for k, v in sorted(info["converted"].items())) or "none"
        lines.append(f"{split}: {counted(info['count'], 'image')} in {counted(len(info['shards']), 'shard')} (converted: {conv})")
    reasons = Counter(r["reason"].split(" (")[0] for r in manifest["rejected"])  # "unreadable image (...)" as one
    why = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(4)) + (", ..." if len(reasons) > 4 else "")
    lines.append(f"rejected: {len(manifest['rejected'])}" + (f" ({why}; each listed in manifest.json)" if reasons else ""))
    if manifest.get("pack_img_per_s"):
        lines.append(f"packed at {manifest['pack_img_per_s']:.0f} img/s in {manifest['pack_seconds']:.1f} s "
                     f"on {counted(manifest.get('pack_workers', 1), 'process', 'processes')} "
                     f"(listing took {manifest.get('list_seconds', 0):.1f} s)")
    return "\n".join(lines)


# -- OUT at a URL: pack here, then upload ------------------------------------------------------
def pack_to_url(src_path: str | Path, url: str, opts: PackOptions | None = None, staging: str | None = None,
                retries: int = 5) -> dict:
    """`vae-dist pack SRC s3://bucket/prefix/`: packs into a local folder (under `staging`, else
    $TMPDIR), then uploads it. Before the hours a pack can take, the prefix is checked: an
    s3:// one (an http(s) server is not written to), holding no set but one pack wrote (an
    index's or another tool's manifest.json is not replaced), and taking a write (read-only or
    refused credentials, a missing bucket: one line now)."""
    import tempfile

    from vae_dist.data.remote import S3Remote, open_remote

    remote = open_remote(url, retries=retries)
    if not isinstance(remote, S3Remote):
        raise DataError(f"cannot pack to {url}: an http(s) server is not written to; pack to a local folder and "
                        f"copy it there, or pack to an s3:// URL")
    check_upload_target(remote)
    staging_dir = output_dir(staging, "pack --staging folder") if staging else None
    local = Path(tempfile.mkdtemp(prefix="vae-dist-pack-", dir=staging_dir))
    try:
        manifest = pack(src_path, local, opts)
        upload_set(local, remote, manifest)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return manifest


def check_upload_target(remote) -> None:
    """The prefix holds no manifest.json but one pack wrote, and takes a write (a probe object,
    removed at once)."""
    if remote.exists(MANIFEST):
        old = remote.read_json(MANIFEST)
        if not _written_by_pack(old):
            raise DataError(f"{remote.url}{MANIFEST} is not one `vae-dist pack` wrote (an index's, or another "
                            f"tool's): pack to another prefix; nothing was written")
    try:
        remote.probe_write("pack")
    except DataError as e:
        raise DataError(f"cannot write into {remote.url}: {e}") from None


def upload_set(folder: Path, remote, manifest: dict) -> None:
    """Uploads a packed folder: every shard and index (multipart, retried: the Remote's), the new
    manifest.json last (Remote.publish). Progress: one line a file on stderr."""
    files = [name for info in manifest["splits"].values() for shard in info["shards"]
             for name in (shard["file"], shard["index"])]
    total = sum((folder / name).stat().st_size for name in files)
    sent, t0 = 0, time.perf_counter()

    def uploaded(n: int, name: str) -> None:
        nonlocal sent
        sent += (folder / name).stat().st_size
        rate = sent / max(time.perf_counter() - t0, 1e-9) / 1e6
        print(f"uploaded {n}/{len(files)} files, {_size(sent)} of {_size(total)} ({rate:.1f} MB/s) to {remote.url}",
              file=sys.stderr, flush=True)

    remote.publish(folder, files, on_upload=uploaded)
