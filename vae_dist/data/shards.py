"""The shard format: WebDataset tars with a DALI index beside each, and manifest.json.

One sample = `<key>.jpg` (RGB JPEG, SxS) + `<key>.label` (the class id as 4 bytes of
little-endian int32, which DALI reads with dtypes=INT32). The `.idx` file is the format
DALI's wds2idx writes (v1.2), produced here from the offsets we write.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import struct
import sys
import tarfile
from pathlib import Path

from vae_dist.errors import DataError
from vae_dist.files import sha256_file, write_atomic

MANIFEST = "manifest.json"
EXTENSIONS = ("jpg", "label")
# what a sample key may hold: a dot would split the WebDataset key, a space the .idx line
_KEY_CHARS = "A-Za-z0-9_-"
_SAFE_KEY = re.compile(f"^[{_KEY_CHARS}]+$")


def safe_key(text: str) -> str:
    """`text` with every character a sample key may not hold made '_'."""
    return re.sub(f"[^{_KEY_CHARS}]", "_", text)


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

    return decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_failure(error: RuntimeError) -> str:
    """The reason in a `decode_rgb` error: "decode_jpeg, FILE.cpp:LINE, the reason'a warning"."""
    text = str(error).strip()
    found = re.search(r"\.cpp:\d+, ([^']+)", text)
    return (found.group(1) if found else text.splitlines()[0] if text else "not a JPEG")[:120]


def undecodable(jpeg: bytes) -> str | None:
    """Why a sample's JPEG does not decode (None: it does)."""
    try:
        with _quiet_stderr():  # libjpeg prints its warnings there; the reason is in the error
            decode_rgb(jpeg)
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
        idx_tmp.write_text(f"v1.2 {len(self._index)}\n" + "\n".join(self._index) + "\n")
        digest = sha256_file(self.tmp)
        size = self.tmp.stat().st_size
        os.replace(idx_tmp, idx_path)
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "index": idx_path.name, "count": self.count, "bytes": size, "sha256": digest}


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode())


def load_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not Path(shard_dir).is_dir():
        raise DataError(f"shard folder not found: {shard_dir}")
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {shard_dir} (make shards with `vae-dist pack`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"corrupt {path}: {e}") from None


def split_files(shard_dir: str | Path, manifest: dict, split: str) -> tuple[list[str], list[str], int]:
    """(tar paths, idx paths, sample count) of a split, after a cheap presence/size check.

    The full sha256 check is `vae-dist verify`; this one catches a missing or truncated
    shard before DALI would fail on it deep inside a worker thread."""
    info = manifest.get("splits", {}).get(split)
    if info is None or not info.get("shards"):
        raise DataError(f"split '{split}' is not in {Path(shard_dir) / MANIFEST}")
    tars, idxs = [], []
    for shard in info["shards"]:
        tar = Path(shard_dir) / shard["file"]
        idx = Path(shard_dir) / shard["index"]
        if not tar.is_file() or not idx.is_file():
            raise DataError(f"missing shard {tar.name if not tar.is_file() else idx.name} in {shard_dir}")
        if tar.stat().st_size != shard["bytes"]:
            raise DataError(f"corrupt shard {tar}: {tar.stat().st_size} bytes, manifest says {shard['bytes']}")
        tars.append(str(tar))
        idxs.append(str(idx))
    return tars, idxs, int(info["count"])


def verify(shard_dir: str | Path) -> list[str]:
    """Every problem with the shards against their manifest, one line each ([] = all good); a
    missing folder or manifest is a DataError."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    problems = []
    for split, info in manifest.get("splits", {}).items():
        total = 0
        for shard in info.get("shards", []):
            problems += _verify_shard(shard_dir, shard)
            total += shard.get("count", 0)
        if total != info.get("count"):
            problems.append(f"{split}: shard counts add up to {total}, manifest says {info.get('count')}")
    return problems


def _verify_shard(shard_dir: Path, shard: dict) -> list[str]:
    tar_path = shard_dir / shard["file"]
    if not tar_path.is_file():
        return [f"{shard['file']}: missing"]
    problems = []
    if sha256_file(tar_path) != shard["sha256"]:
        problems.append(f"{shard['file']}: sha256 mismatch (corrupt or truncated)")
    components: dict[str, set[str]] = {}
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext in components.get(key, ()):
                    problems.append(f"{shard['file']}: sample key {key!r} appears twice (pack again: keys are unique)")
                components.setdefault(key, set()).add(ext)
                if ext == "jpg" and member.size == 0:
                    problems.append(f"{shard['file']}: sample {key} has an empty image")
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{shard['file']}: unreadable tar ({e})")
    for key in components:
        if not _SAFE_KEY.match(key):
            problems.append(f"{shard['file']}: sample key {key!r} holds characters the .idx format cannot "
                            f"carry (pack again)")
    if len(components) != shard["count"]:
        problems.append(f"{shard['file']}: {len(components)} samples, manifest says {shard['count']}")
    for key, exts in components.items():
        missing = set(EXTENSIONS) - exts
        if missing:
            problems.append(f"{shard['file']}: sample {key} lacks {', '.join(sorted(missing))}")
    idx_path = shard_dir / shard["index"]
    if not idx_path.is_file():
        problems.append(f"{shard['index']}: missing")
    else:
        lines = idx_path.read_text().splitlines()
        header = lines[0].split() if lines else []
        if len(header) != 2 or header[0] != "v1.2" or header[1] != str(shard["count"]) \
                or len(lines) - 1 != shard["count"]:
            problems.append(f"{shard['index']}: does not index {shard['count']} samples")
        bad = [n for n, line in enumerate(lines[1:], start=2) if not _idx_line_ok(line)]
        if bad:
            problems.append(f"{shard['index']}: {len(bad)} lines do not parse as 'ext offset size name' "
                            f"(first: line {bad[0]})")
    return problems


def _idx_line_ok(line: str) -> bool:
    try:
        return set(parse_index_line(line)) == set(EXTENSIONS)
    except ValueError:
        return False


def class_names(manifest: dict) -> list[str]:
    """Readable class names in label order (words.txt text, else the wnid)."""
    words = manifest.get("words", {})
    return [words.get(w, w) for w in manifest.get("classes", [])]
