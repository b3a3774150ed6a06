"""The shard format: WebDataset tars with a DALI index beside each, and manifest.json.

One sample = `<key>.jpg` (RGB JPEG, SxS) + `<key>.label` (the class id as 4 bytes of
little-endian int32, which DALI reads with dtypes=INT32). The `.idx` file is the format
DALI's wds2idx writes (v1.2), produced here from the offsets we write. `ShardSet` is a shard
folder as a run reads it, once: the manifest's facts and each split's files.

Sets that `vae-dist index` describes (tars other tools wrote, e.g. img2dataset's) differ in
three ways, all read here: the image member is any of IMAGE_EXTS, of any size (the manifest
says `"resize": true`: every image is resized and centre-cropped to SxS at decode); the labels
live in a side file per shard and split (int32 little-endian, one per `.idx` line) or are -1;
and an `.idx` may list a subset of its tar (a val fraction: one tar, a train and a val .idx).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
import re
import struct
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vae_dist.data.fetch import FetchOptions, TarFetch, base_url, fetch_all, tar_url
from vae_dist.data.remote import is_url
from vae_dist.errors import DataError
from vae_dist.files import sha256_file, write_atomic

MANIFEST = "manifest.json"
EXTENSIONS = ("jpg", "label")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image member of a sample, by extension (index.py)
FORMAT_INDEXED = "vae-dist-index/1"  # manifest.json's "format" of a set `vae-dist index` described
# what a sample key may hold: a dot would split the WebDataset key, a space the .idx line
_KEY_CHARS = "A-Za-z0-9_-"
_SAFE_KEY = re.compile(f"^[{_KEY_CHARS}]+$")


def safe_key(text: str) -> str:
    """`text` with every character a sample key may not hold made '_'."""
    return re.sub(f"[^{_KEY_CHARS}]", "_", text)


def is_safe_key(key: str) -> bool:
    return bool(_SAFE_KEY.match(key))


def split_name(name: str) -> tuple[str, str]:
    """(key, ext) of a tar member: the key ends at the first dot of the base name, as WebDataset
    and DALI's wds2idx split it."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def image_ext(parts) -> str | None:
    """The image component of a sample's components (an .idx line's, or a WebDataset sample's keys)."""
    return next((ext for ext in IMAGE_EXTS if ext in parts), None)


def parse_index_line(line: str) -> dict[str, tuple[int, int]]:
    """{ext: (offset, size)} of one `.idx` line ("ext offset size name" per component);
    ValueError where it does not parse (a key with a space splits it)."""
    fields = line.split()
    if not fields or len(fields) % 4:
        raise ValueError("not 4 fields per component")
    parts = {fields[k]: (int(fields[k + 1]), int(fields[k + 2])) for k in range(0, len(fields), 4)}
    if any(offset < 0 or size < 0 for offset, size in parts.values()):
        raise ValueError("a negative offset or size")
    return parts


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def decode_rgb(jpeg):
    """A sample's JPEG as uint8 (3, S, S), by torchvision's libjpeg-turbo: the webdataset loader's
    decoder, and the strictest at hand (it refuses what DALI's decoders refuse)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if len(jpeg) == 0:  # torch.frombuffer refuses an empty buffer with a ValueError
        raise RuntimeError("an empty image")
    return decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_failure(error: RuntimeError) -> str:
    """The reason in a `decode_rgb` error: "decode_jpeg, FILE.cpp:LINE, the reason'a warning"."""
    text = str(error).strip()
    found = re.search(r"\.cpp:\d+, ([^']+)", text)
    return (found.group(1) if found else text.splitlines()[0] if text else "not a JPEG")[:120]


def decode_any(data, ext: str = "jpg"):
    """A sample's image member as uint8 (3, H, W): JPEG by `decode_rgb`, png and webp by
    torchvision's decode_image (the members `vae-dist index` accepts)."""
    if ext in ("jpg", "jpeg"):
        return decode_rgb(data)
    import torch
    from torchvision.io import ImageReadMode, decode_image

    if len(data) == 0:
        raise RuntimeError("an empty image")
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def preload_resize() -> None:
    """Imports what `fit_square` uses (~1 s), in a process about to fork its decode workers: each
    would otherwise import it again, and the webdataset loader's workers start every epoch."""
    import torchvision.transforms.v2.functional  # noqa: F401


def fit_square(image, size: int):
    """uint8 (3, H, W) -> (3, size, size): the shorter side resized to `size` (antialiased), then
    the centre cropped; what DALI's fn.resize(resize_shorter) + centre crop do for a set of mixed sizes."""
    from torchvision.transforms.v2 import functional as F

    if image.shape[-2:] != (size, size):
        image = F.center_crop(F.resize(image, size, antialias=True), [size, size])
    return image


def undecodable(jpeg: bytes, ext: str = "jpg") -> str | None:
    """Why a sample's image does not decode (None: it does)."""
    try:
        with _quiet_stderr():  # libjpeg prints its warnings there; the reason is in the error
            decode_any(jpeg, ext)
    except RuntimeError as e:
        return decode_failure(e)
    return None


def damaged_sample(tar: str, key: str, reason: str) -> DataError:
    """The one-line error of a sample that does not decode, for either loader."""
    split = Path(tar).name.rsplit("-", 1)[0]  # shards are SPLIT-NNNNNN.tar
    return DataError(f"{split} sample {key} in {tar} does not decode ({reason}): the shard is damaged; "
                     f"`vae-dist verify {Path(tar).parent}` checks every shard, and packing again replaces it")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def encode_label(label: int) -> bytes:
    return struct.pack("<i", label)


def decode_label(data: bytes) -> int:
    return struct.unpack("<i", data)[0]


class ShardWriter:
    """Writes one tar and its index; both appear under their final names only on close()."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.GNU_FORMAT)
        self._index: list[str] = []
        self.count = 0

    def _add(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self._tar.addfile(info, io.BytesIO(data))
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return self._tar.offset - padded, len(data)  # where the member's data starts

    def write(self, key: str, jpeg: bytes, label: int) -> None:
        if not _SAFE_KEY.match(key):
            raise DataError(f"sample key {key!r} may hold only letters, digits, '_' and '-'")
        parts = []
        for ext, data in (("jpg", jpeg), ("label", encode_label(label))):
            offset, size = self._add(f"{key}.{ext}", data)
            parts.append(f"{ext} {offset} {size} {key}.{ext}")
        self._index.append(" ".join(parts))
        self.count += 1

    def close(self) -> dict:
        self._tar.close()
        idx_path = self.path.with_suffix(".idx")
        idx_tmp = idx_path.with_name(idx_path.name + ".partial")
        index = (f"v1.2 {len(self._index)}\n" + "\n".join(self._index) + "\n").encode()
        idx_tmp.write_bytes(index)
        digest = sha256_file(self.tmp)
        size = self.tmp.stat().st_size
        os.replace(idx_tmp, idx_path)
        os.replace(self.tmp, self.path)
        # the index's digest too: a run checks it at start (cheap), where an edited offset would
        # otherwise surface as a decode failure deep inside DALI
        return {"file": self.path.name, "index": idx_path.name, "count": self.count, "bytes": size, "sha256": digest,
                "index_sha256": hashlib.sha256(index).hexdigest()}


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode())


def load_manifest(shard_dir: str | Path, remote=None) -> dict:
    """manifest.json as read and checked for shape: the one place every command (verify, train,
    eval, viz, encode, bench) reads it, so a damaged or hand-edited one is refused alike.
    `remote`: the folder is at a URL (data.remote.Remote), read from there."""
    if remote is not None:
        return parse_manifest(remote.read(MANIFEST), remote.describe(MANIFEST))
    path = Path(shard_dir) / MANIFEST
    if not Path(shard_dir).is_dir():
        raise DataError(f"shard folder not found: {shard_dir}")
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {shard_dir} (make shards with `vae-dist pack`)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"unreadable {path}: {e}") from None
    return parse_manifest(data, path)


def parse_manifest(data: bytes, path) -> dict:
    """manifest.json's bytes as a checked manifest; `path`: where they were read, for the messages."""
    try:
        manifest = json.loads(data.decode())
    except json.JSONDecodeError as e:
        raise DataError(f"corrupt {path}: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"unreadable {path}: {e}") from None
    try:
        _check_shape(manifest)
    except _BadKey as e:
        key, should, value = e.args
        if value is _MISSING:
            raise DataError(f"corrupt {path}: no valid {key!r} (pack the shards again)") from None
        got = {list: "a list", dict: "an object"}.get(type(value)) or (repr(value) if len(repr(value)) <= 200
                                                                       else repr(value)[:197] + "...")
        raise DataError(f"corrupt {path}: {key or 'the file'} should be {should}, got {got} "
                        f"(pack the shards again)") from None
    return manifest


class _BadKey(Exception):
    """(key, what it should be, its value or _MISSING) of the first key of a manifest that is wrong."""


_MISSING = object()
_WHOLE = "a whole number (0 or more)"
_IN_FOLDER = "a bare file name (nothing outside the shard folder is read)"


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _in_folder(value) -> bool:
    """A bare file name: an absolute path, a folder part or '..' would read outside the shard folder."""
    return isinstance(value, str) and value not in ("", ".", "..") and not any(c in value for c in "/\\\0")


def _field(obj: dict, key: str, name: str, ok, should: str, required: bool = True):
    """obj[key] where ok(it) holds; `name`: the key's full dotted name, for the message."""
    if key not in obj:
        if required:
            raise _BadKey(name, should, _MISSING)
        return None
    if not ok(obj[key]):
        raise _BadKey(name, should, obj[key])
    return obj[key]


def _check_shape(manifest) -> None:
    """Every key the commands read, of the type they read it as; raises _BadKey at the first that is not."""
    if not isinstance(manifest, dict):
        raise _BadKey("", "a JSON object", manifest)
    _field(manifest, "image_size", "image_size", lambda v: _whole(v) and v > 0, "a positive whole number of pixels")
    _field(manifest, "classes", "classes", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
           "a list of class names", required=False)
    _field(manifest, "words", "words", lambda v: isinstance(v, dict) and all(isinstance(t, str) for t in v.values()),
           "an object of class name -> text", required=False)
    # a set `vae-dist index` described: images of any size, and maybe tars in another folder
    _field(manifest, "resize", "resize", lambda v: isinstance(v, bool), "true or false", required=False)
    _field(manifest, "shard_base", "shard_base", lambda v: isinstance(v, str) and v != "",
           "the folder of the tars (a path, absolute or relative to the manifest's folder, or a URL)", required=False)
    splits = _field(manifest, "splits", "splits", lambda v: isinstance(v, dict), "an object of split -> its shards")
    for split, info in splits.items():
        name = f"splits.{split}"
        _field(splits, split, name, lambda v: isinstance(v, dict), "an object with 'count' and 'shards'")
        _field(info, "count", f"{name}.count", _whole, _WHOLE)
        shards = _field(info, "shards", f"{name}.shards", lambda v: isinstance(v, list), "a list of shards")
        for n, shard in enumerate(shards):
            at = f"{name}.shards[{n}]"
            if not isinstance(shard, dict):
                raise _BadKey(at, "an object with 'file', 'index', 'count', 'bytes' and 'sha256'", shard)
            _field(shard, "file", f"{at}.file", _in_folder, _IN_FOLDER)
            _field(shard, "index", f"{at}.index", _in_folder, _IN_FOLDER)
            _field(shard, "count", f"{at}.count", _whole, _WHOLE)
            _field(shard, "bytes", f"{at}.bytes", _whole, _WHOLE)
            for digest in ("sha256", "index_sha256"):  # index_sha256: packs since issue 43
                _field(shard, digest, f"{at}.{digest}", lambda v: isinstance(v, str), "a sha256 in hex",
                       required=digest == "sha256")
            # an indexed set's labels: a side file beside the .idx (where a member held them)
            if _field(shard, "labels", f"{at}.labels", _in_folder, _IN_FOLDER, required=False) is not None:
                _field(shard, "labels_sha256", f"{at}.labels_sha256", lambda v: isinstance(v, str), "a sha256 in hex")


@dataclass(frozen=True)
class SplitFiles:
    """One split's shards as the loaders take them (paths as strings, as DALI's reader wants)."""

    tars: tuple[str, ...]
    idxs: tuple[str, ...]
    counts: tuple[int, ...]  # samples per shard
    count: int
    # per shard, its side file of labels (an indexed set's) or None (labels in `.label` members, or -1)
    labels: tuple[str | None, ...] = ()
    # tars at a URL: `tars` are where the shard cache keeps them, and fetch(t) puts shard t there
    # (verified) and returns its path; None: local tars, there already
    fetch: TarFetch | None = None


@dataclass(frozen=True)
class ShardSet:
    """A shard folder read once: manifest.json's facts and each split's files. A run opens it
    once and hands it to the loaders, the cache decision, the hooks, viz, eval and encode, so
    nothing re-reads the manifest or looks the files up again."""

    root: str
    manifest: dict  # as read, for `vae-dist verify`, which checks every field
    image_size: int
    class_names: tuple[str, ...]  # readable names in label order (words.txt text, else the wnid)
    counts: dict[str, int]  # images per split, for the splits the manifest holds
    # an indexed set's images vary in size: each is resized and centre-cropped to SxS at decode
    resize: bool = False
    # the shard cache's settings where the set (or its tars) is at a URL; None: all local
    fetch_options: FetchOptions | None = None
    _files: dict[str, SplitFiles] = field(default_factory=dict, compare=False, repr=False)
    _caches: dict = field(default_factory=dict, compare=False, repr=False)  # this process's ShardCaches, by URL
    _fetched: dict = field(default_factory=dict, compare=False, repr=False)  # fetch_everything's stats, once done

    def __getstate__(self):
        # what another rank gets: the manifest's facts; it checks and caches files itself
        return {**self.__dict__, "_files": {}, "_caches": {}, "_fetched": {}}

    @classmethod
    def open(cls, root: str | Path, fetch: FetchOptions | None = None) -> ShardSet:
        """The shard set at `root`, a folder or an http(s):// or s3:// URL; `fetch`: how shards at
        a URL are cached and fetched (data.shard_cache, ...; the defaults where None)."""
        root = str(root)
        fetch = fetch or FetchOptions()
        manifest = load_manifest(root, fetch.remote(root) if is_url(root) else None)
        try:
            words = manifest.get("words", {})
            return cls(root=root, manifest=manifest, image_size=int(manifest["image_size"]),
                       class_names=tuple(words.get(w, w) for w in manifest.get("classes", [])),
                       counts={name: int(info["count"]) for name, info in manifest.get("splits", {}).items()},
                       resize=bool(manifest.get("resize", False)),
                       fetch_options=fetch if is_url(root) or tar_url(root, manifest) else None)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"corrupt {manifest_location(root)}: no valid {e} (pack the shards again)") from None

    def count(self, split: str) -> int:
        return self.counts.get(split, 0)

    @property
    def is_remote(self) -> bool:
        """The tars are at a URL (read through the shard cache)."""
        return self.fetch_options is not None and tar_url(self.root, self.manifest) is not None

    def shard_bytes(self) -> int:
        """The bytes of every tar of every split: what a shard cache must hold to keep them all."""
        tars = {(s["file"], s["sha256"]): s["bytes"] for info in self.manifest.get("splits", {}).values()
                for s in info.get("shards", [])}  # an indexed set's val fraction lists a tar in both splits
        return sum(tars.values())

    def fits_shard_cache(self) -> bool:
        return not self.is_remote or self.shard_bytes() <= self.fetch_options.cache_bytes

    def fetch_everything(self, splits=("train", "val"), say=None) -> dict | None:
        """Where the tars are at a URL and all fit the shard cache: every one of `splits` into
        it now (once per process; a later call, or another rank on the node, finds them there).
        Returns the link's stats, or None where nothing was to fetch."""
        if not self.is_remote or self._fetched:
            return None
        fetches = [self.files(s).fetch for s in splits if self.count(s)]
        stats = fetch_all(fetches, self.fetch_options.prefetch, say=say)
        self._fetched.update(stats, done=True)
        return stats

    def _cache(self, url: str):
        if url not in self._caches:
            self._caches[url] = self.fetch_options.cache_for(self.fetch_options.remote(url))
        return self._caches[url]

    def _small_file(self, name: str, sha256: str | None) -> Path:
        """A manifest-listed small file (.idx, labels) as a local path: in the folder, or for a
        set at a URL, fetched (verified by its sha256) into the shard cache."""
        if not is_url(self.root):
            return Path(self.root) / name
        if sha256 is None:
            raise DataError(f"{manifest_location(self.root)} records no sha256 of {name}, which reading it from "
                            f"a URL needs: pack the set again (packs since issue 43 record it)")
        return Path(self._cache(self.root).path(name, None, sha256))

    @property
    def tar_dir(self) -> Path:
        """Where the tars are: the shard folder, or an indexed set's `shard_base` (relative to it)."""
        return tar_dir(self.root, self.manifest)

    def identity(self) -> dict:
        """What a checkpoint records of the data it was trained on: the folder, and a digest of
        every split's shard digests and counts in order (the sample order follows from them and
        the seed). Packing again with another --seed, or another set, gives another digest; the
        same pack run again (deterministic) gives the same one."""
        splits = {name: [[s.get("sha256"), s.get("count")] for s in info.get("shards", [])]
                  for name, info in sorted(self.manifest.get("splits", {}).items())}
        text = json.dumps({"image_size": self.image_size, "splits": splits}, sort_keys=True)
        where = self.root if is_url(self.root) else str(Path(self.root).resolve())
        return {"shards": where, "digest": hashlib.sha256(text.encode()).hexdigest()[:16]}

    def files(self, split: str) -> SplitFiles:
        """The split's tars and indexes, after a cheap presence/size check, made once per split.

        The full sha256 check is `vae-dist verify`; this one catches a missing or truncated
        shard before DALI would fail on it deep inside a worker thread."""
        if split not in self._files:
            self._files[split] = self._check(split)
        return self._files[split]

    def _check(self, split: str) -> SplitFiles:
        info = self.manifest.get("splits", {}).get(split)
        if info is None or not info.get("shards"):
            raise DataError(f"split '{split}' is not in {manifest_location(self.root)}")
        url = tar_url(self.root, self.manifest) if self.fetch_options is not None else None
        fetch = TarFetch(self._cache(url), info["shards"]) if url else None
        tars, idxs, labels = [], [], []
        for t, shard in enumerate(info["shards"]):
            idx = self._small_file(shard["index"], shard.get("index_sha256"))
            if not idx.is_file():
                raise DataError(f"missing shard index {idx.name} in {self.root}")
            if fetch is not None:  # checked on arrival, against the manifest's size and sha256
                tar = Path(fetch.local_path(t))
            else:
                tar = self.tar_dir / shard["file"]
                if not tar.is_file():
                    raise DataError(f"missing shard {tar.name} in {self.root}")
                if tar.stat().st_size != shard["bytes"]:
                    raise DataError(f"corrupt shard {tar}: {tar.stat().st_size} bytes, manifest says {shard['bytes']}")
            self._check_index(idx, shard)
            labels.append(self._check_labels(shard))
            tars.append(str(tar))
            idxs.append(str(idx))
        counts = tuple(s["count"] for s in info["shards"])
        if sum(counts) != info["count"]:
            raise DataError(f"corrupt {manifest_location(self.root)}: the {split} shards' counts add up to {sum(counts)}, "
                            f"splits.{split}.count says {info['count']} (pack the shards again)")
        return SplitFiles(tuple(tars), tuple(idxs), counts, info["count"], tuple(labels), fetch)

    def _check_labels(self, shard: dict) -> str | None:
        """An indexed shard's side file of labels, checked whole (4 bytes a sample: cheap)."""
        if "labels" not in shard:
            return None
        path = self._small_file(shard["labels"], shard["labels_sha256"])
        if not path.is_file():
            raise DataError(f"missing shard labels {path.name} in {self.root} (`vae-dist index` writes them)")
        if hashlib.sha256(path.read_bytes()).hexdigest() != shard["labels_sha256"]:
            raise DataError(f"corrupt shard labels {path}: its sha256 is not the one {MANIFEST} records: "
                            f"`vae-dist index` again writes them anew")
        return str(path)

    def _check_index(self, idx: Path, shard: dict) -> None:
        """The shard's `.idx` against the manifest: its digest where pack recorded one, and its
        sample count, which both loaders need to trust (DALI reads the samples the .idx lists,
        the webdataset loader counts them off the tar). Reading ~9 MB of .idx for Tiny ImageNet
        costs milliseconds; the tars' sha256 is `vae-dist verify`'s."""
        data = idx.read_bytes()
        if "index_sha256" in shard and hashlib.sha256(data).hexdigest() != shard["index_sha256"]:
            raise DataError(f"corrupt shard index {idx}: its sha256 is not the one {MANIFEST} records (edited or "
                            f"damaged): `vae-dist verify {self.root}` names the line, packing again replaces it")
        listed = max(len(data.splitlines()) - 1, 0)  # after the "v1.2 N" header
        if listed != shard["count"]:
            raise DataError(f"shard {shard['file']} holds {listed} samples ({idx} lists them), {MANIFEST} says "
                            f"{shard['count']}: the shards and their manifest disagree; `vae-dist verify {self.root}` "
                            f"checks every shard, and packing again replaces them")


def manifest_location(root: str) -> str:
    """Where a set's manifest.json is, a folder's or a URL's, for the messages."""
    return f"{root.rstrip('/')}/{MANIFEST}" if is_url(root) else str(Path(root) / MANIFEST)


def tar_dir(root: str | Path, manifest: dict) -> Path:
    """The folder of a set's tars: its own, or `shard_base` (absolute, or relative to `root`).
    A shard_base that is a URL (`vae-dist index URL --out DIR`) is no local folder: one line,
    where a caller would read it as one (tar_url says it)."""
    base = base_url(manifest)
    if base is not None:
        raise DataError(f"the tars of {root} are at {base} (its {MANIFEST}'s shard_base), not in a local folder")
    return Path(root) / manifest.get("shard_base", ".")


def is_indexed(manifest: dict) -> bool:
    """A set `vae-dist index` described (tars another tool wrote), not one `pack` wrote."""
    return manifest.get("format") == FORMAT_INDEXED


def read_labels(path: str | Path | None, count: int) -> np.ndarray:
    """A side file's labels (int32 little-endian, one per .idx line), or -1 for each where there is none."""
    if path is None:
        return np.full(count, -1, dtype=np.int32)
    labels = np.fromfile(path, dtype="<i4").astype(np.int32)
    if len(labels) != count:
        raise DataError(f"corrupt shard labels {path}: {len(labels)} labels for {count} samples "
                        f"(`vae-dist index` again writes them anew)")
    return labels


def index_keys(idx: str | Path) -> list[tuple[str, str, bool]]:
    """(key, image ext, whether a `.label` member holds its label) of each sample an `.idx` lists,
    in its order: how the webdataset loader finds a streamed sample's id by its key (an .idx may
    list a subset of its tar)."""
    out = []
    for n, line in enumerate(Path(idx).read_text().splitlines()[1:], start=2):
        fields = line.split()
        ext = image_ext(fields[0::4])
        if ext is None or len(fields) % 4:
            raise DataError(f"{idx} line {n} lists no image member ({line[:80]!r}): `vae-dist verify "
                            f"{Path(idx).parent}` checks every line")
        out.append((split_name(fields[3])[0], ext, "label" in fields[0::4]))
    return out


def _check_bounds(idx, line: int, parts: dict[str, tuple[int, int]], tar_bytes: int) -> None:
    """One `.idx` line's components lie inside the tar and the label is 4 bytes: a damaged index
    is one line here, not a failure deep inside DALI (`vae-dist verify` checks every member)."""
    for ext, (offset, size) in parts.items():
        if offset + size > tar_bytes:
            raise DataError(f"corrupt shard index {idx}: line {line} puts its {ext} at bytes {offset}-{offset + size}, "
                            f"past the end of its tar ({tar_bytes} bytes): `vae-dist verify {Path(idx).parent}` "
                            f"checks every line, packing again replaces it")
    if "label" in parts and parts["label"][1] != 4:
        raise DataError(f"corrupt shard index {idx}: line {line} gives its label {parts['label'][1]} bytes, a label is 4: "
                        f"`vae-dist verify {Path(idx).parent}` checks every line, packing again replaces it")


class ShardIndex:
    """Where each sample's image lies (tar, offset, size), read from the `.idx` files, and its label.

    The image is the line's jpg (or jpeg, png, webp) component; the label its `.label` member's,
    else the shard's side file's (`label_paths`, an indexed set's), else -1.

    `fetch` (SplitFiles.fetch: tars at a URL): a tar is fetched into the shard cache and mapped
    only when a batch first needs it (`open`), and its `.label` members read then; `release`
    unmaps one a stream has left behind, so the cache may evict it and its disk is given back."""

    def __init__(self, tar_paths, idx_paths, label_paths=None, fetch=None):
        self.tar_paths, self.idx_paths = list(tar_paths), list(idx_paths)
        self.fetch = fetch
        label_paths = list(label_paths) if label_paths else [None] * len(self.tar_paths)
        n = len(self.tar_paths)
        self.maps, self.arrays = [None] * n, [None] * n  # the mmaps, and a uint8 view of each (slicing a view is cheap)
        self._label_members: dict[int, tuple[list[int], list[int]]] = {}  # a tar not mapped yet: its labels to read
        tars, offsets, sizes, labels, exts = [], [], [], [], []
        for t, idx in enumerate(self.idx_paths):
            # a tar at a URL may not be here yet: the manifest's size, which its arrival is checked against
            tar_bytes = os.path.getsize(self.tar_paths[t]) if fetch is None else fetch.items[t][1]
            lines = Path(idx).read_text().splitlines()[1:]
            members = ([], [])  # the rows whose label a `.label` member holds, and its offset in the tar
            for n_line, line in enumerate(lines, start=2):
                try:
                    parts = parse_index_line(line)
                except ValueError:
                    raise DataError(f"{idx} line {n_line} does not parse ({line[:80]!r}; a sample key with a space?): "
                                    f"pack the data again with `vae-dist pack`") from None
                ext = image_ext(parts)
                if ext is None:
                    raise DataError(f"{idx}: a sample without an image ({line[:80]})")
                _check_bounds(idx, n_line, parts, tar_bytes)
                at, size = parts[ext]
                tars.append(t)
                offsets.append(at)
                sizes.append(size)
                exts.append(IMAGE_EXTS.index(ext))
                if "label" in parts:  # read from the tar when it is mapped (_map)
                    members[0].append(len(labels))
                    members[1].append(parts["label"][0])
                labels.append(None)  # from the member, the side file, or -1
            if label_paths[t] is not None:  # an indexed shard's: one per line, -1 where no member held one
                labels[len(labels) - len(lines):] = read_labels(label_paths[t], len(lines)).tolist()
            elif members[0]:
                self._label_members[t] = members
        labels = [-1 if label is None else label for label in labels]  # no label anywhere: -1
        self.tar, self.offset, self.end = np.array(tars), np.array(offsets), np.array(offsets) + np.array(sizes)
        self.labels = np.array(labels, dtype=np.int32)
        self.exts = np.array(exts, dtype=np.uint8)  # each sample's image extension, as IMAGE_EXTS[i]
        if fetch is None:  # local tars: all mapped now (their labels read); a URL's when a batch first needs them
            for t in range(n):
                self._map(t)

    def _map(self, t: int, path: str | None = None) -> None:
        """Maps tar t (from `path`, where it was fetched to) and reads its `.label` members."""
        with open(path or self.tar_paths[t], "rb") as f:
            self.maps[t] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.arrays[t] = np.frombuffer(self.maps[t], dtype=np.uint8)
        rows, offsets = self._label_members.pop(t, ((), ()))
        for row, at in zip(rows, offsets):
            self.labels[row] = decode_label(self.maps[t][at:at + 4])

    def open(self, shards, path_of=None) -> None:
        """Maps the tars `shards` (ids) that are not mapped yet; `path_of(t)`: the local path of
        tar t, once fetched (a prefetcher's), else fetched here through the cache."""
        for t in shards:
            if self.maps[t] is None:
                self._map(t, (path_of or self.fetch)(t))

    def release(self, shards) -> None:
        """Unmaps the tars `shards` (ids): the stream is past them. A view still held (a batch
        DALI has not copied yet) keeps its map open until it is dropped."""
        for t in shards:
            if self.maps[t] is not None:
                self.arrays[t] = None
                try:
                    self.maps[t].close()
                except BufferError:
                    pass
                self.maps[t] = None

    def __len__(self) -> int:
        return len(self.labels)

    def where(self, sample_id: int) -> tuple[str, str]:
        """(tar path, sample key) of one sample, read from its .idx line (only to name it)."""
        t = int(self.tar[sample_id])
        line = int(sample_id - np.searchsorted(self.tar, t))  # its line in the tar's .idx, after the header
        name = Path(self.idx_paths[t]).read_text().splitlines()[1 + line].split()[3]
        return self.tar_paths[t], split_name(name)[0]

    def ext(self, sample_id: int) -> str:
        return IMAGE_EXTS[int(self.exts[sample_id])]

    def close(self) -> None:
        """Unmaps the tars (a view still held keeps its map open until it is dropped)."""
        self.release(range(len(self.maps)))

    def jpegs(self, ids: np.ndarray) -> list[np.ndarray]:
        if self.fetch is not None:
            self.open(dict.fromkeys(self.tar[ids].tolist()))
        arrays = self.arrays
        return [arrays[t][a:b] for t, a, b in zip(self.tar[ids].tolist(), self.offset[ids].tolist(),
                                                   self.end[ids].tolist())]
