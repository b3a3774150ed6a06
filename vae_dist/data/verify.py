"""`vae-dist verify`: every shard against manifest.json, every problem one line.

Checks what a loader's start-up check cannot afford: the sha256 of each tar, every sample
complete and unique, every `.idx` line against the tar's members (each sample's key, each
component's offset and size), and the manifest's own shape (at load: `load_manifest`). Its
measured cost: the README, data.verify.

A set `vae-dist index` described (tars another tool wrote) is checked for what that promises:
each `.idx` line names a sample of its tar (in tar order, a subset where the val split took a
fraction) with an image member, its components where the tar holds them; the side file of
labels whole; the tars' other members are not ours to judge. Where such a set's tars are at a
URL (its shard_base), each is downloaded into a temporary folder, checked and deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tarfile
import tempfile
from pathlib import Path

from vae_dist.data.fetch import base_url
from vae_dist.data.shards import (
    EXTENSIONS,
    image_ext,
    is_indexed,
    is_safe_key,
    load_manifest,
    parse_index_line,
    split_name,
    tar_dir,
)
from vae_dist.files import sha256_file


def verify(shard_dir: str | Path, manifest: dict | None = None) -> list[str]:
    """Every problem with the shards against their manifest (`manifest`: already read, by a
    ShardSet), one line each ([] = all good); a missing folder or manifest is a DataError."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir) if manifest is None else manifest
    problems = []
    url = base_url(manifest)
    tars = _UrlTars(url) if url is not None else _LocalTars(tar_dir(shard_dir, manifest))
    scanned: dict[str, tuple] = {}  # an indexed tar read once for its train and its val .idx
    try:
        for split, info in manifest.get("splits", {}).items():
            total = 0
            for shard in info.get("shards", []):
                problems += (_verify_indexed_shard(shard_dir, tars, shard, scanned) if is_indexed(manifest)
                             else _verify_shard(shard_dir, shard))
                total += shard.get("count", 0)
            if total != info.get("count"):
                problems.append(f"{split}: shard counts add up to {total}, manifest says {info.get('count')}")
    finally:
        tars.close()
    return problems


class _LocalTars:
    """An indexed set's tars in a local folder: `fetch(name)` gives the tar's path, or None."""

    def __init__(self, folder: Path):
        self.where = folder

    @contextlib.contextmanager
    def fetch(self, name: str):
        path = self.where / name
        yield path if path.is_file() else None

    def close(self) -> None:
        pass


class _UrlTars:
    """An indexed set's tars at a URL: `fetch(name)` downloads one into a temporary folder (None
    where the server lacks it), deleted when checked; a link that fails is one line."""

    def __init__(self, url: str):
        from vae_dist.data.remote import open_remote

        self.remote, self.where = open_remote(url), url
        self.work = Path(tempfile.mkdtemp(prefix="vae-dist-verify-"))

    @contextlib.contextmanager
    def fetch(self, name: str):
        from vae_dist.data.remote import _Missing

        local = self.work / name
        try:
            try:
                self.remote.download(name, local)  # checked against the manifest by _scan, as a local tar
            except _Missing:
                yield None
                return
            yield local
        finally:
            local.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def _verify_shard(shard_dir: Path, shard: dict) -> list[str]:
    tar_path = shard_dir / shard["file"]
    if not tar_path.is_file():
        return [f"{shard['file']}: missing"]
    problems = []
    if sha256_file(tar_path) != shard["sha256"]:
        problems.append(f"{shard['file']}: sha256 mismatch (corrupt or truncated)")
    components: dict[str, set[str]] = {}
    members: list[tarfile.TarInfo] = []  # the regular files, in tar order: what the .idx must list
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.isreg():  # a loader reads file members only: a link's target never
                    problems.append(f"{shard['file']}: member {member.name} is a {_kind(member)}, not a file "
                                    f"(pack again: shards hold files only)")
                    continue
                members.append(member)
                key, _, ext = member.name.partition(".")
                if ext in components.get(key, ()):
                    problems.append(f"{shard['file']}: sample key {key!r} appears twice (pack again: keys are unique)")
                components.setdefault(key, set()).add(ext)
                if ext == "jpg" and member.size == 0:
                    problems.append(f"{shard['file']}: sample {key} has an empty image")
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{shard['file']}: unreadable tar ({e})")
    for key in components:
        if not is_safe_key(key):
            problems.append(f"{shard['file']}: sample key {key!r} holds characters the .idx format cannot "
                            f"carry (pack again)")
    if len(components) != shard["count"]:
        problems.append(f"{shard['file']}: {len(components)} samples, manifest says {shard['count']}")
    for key, exts in components.items():
        missing = set(EXTENSIONS) - exts
        if missing:
            problems.append(f"{shard['file']}: sample {key} lacks {', '.join(sorted(missing))}")
    lines, index_problems = _read_index(shard_dir, shard)
    problems += index_problems
    if lines is not None:
        problems += _verify_index(lines, shard, members)
    return problems


def _verify_indexed_shard(shard_dir: Path, tars, shard: dict, scanned: dict) -> list[str]:
    if shard["file"] not in scanned:
        with tars.fetch(shard["file"]) as tar_path:
            if tar_path is None:
                return [f"{shard['file']}: missing (in {tars.where})"]
            scanned[shard["file"]] = _scan(tar_path, shard)
    samples, problems = scanned[shard["file"]]
    lines, index_problems = _read_index(shard_dir, shard)
    problems = problems + index_problems  # the tar's own problems, said for each of its .idx files
    if lines is None:
        return problems
    order = {key: n for n, key in enumerate(samples)}
    last, seen = -1, set()
    for n, line in enumerate(lines[1:], start=2):
        why = _indexed_line_differs(line, samples, order, last, seen)
        if why:
            problems.append(f"{shard['index']}: line {n} {why}: the index does not match its tar")
            break
        key = split_name(line.split()[3])[0]
        last = order[key]
        seen.add(key)
    problems += _verify_labels(shard_dir, shard)
    return problems


def _scan(tar_path: Path, shard: dict) -> tuple[dict, list[str]]:
    """({key: {ext: (offset, size, name)}} of a tar's file members, in tar order; its problems)."""
    problems = []
    if sha256_file(tar_path) != shard["sha256"]:
        problems.append(f"{shard['file']}: sha256 mismatch (corrupt, truncated or changed since it was indexed)")
    samples: dict[str, dict[str, tuple[int, int, str]]] = {}
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.isreg():
                    key, ext = split_name(member.name)
                    samples.setdefault(key, {})[ext] = (member.offset_data, member.size, member.name)
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{shard['file']}: unreadable tar ({e})")
    return samples, problems


def _indexed_line_differs(line: str, samples: dict, order: dict, last: int, seen: set) -> str | None:
    try:
        parts = parse_index_line(line)
    except ValueError:
        return "does not parse as 'ext offset size name' per component"
    if image_ext(parts) is None:
        return "lists no image member (jpg, jpeg, png or webp)"
    key = split_name(line.split()[3])[0]
    if key not in samples:
        return f"lists sample {key}, which the tar does not hold"
    if key in seen:
        return f"lists sample {key} twice"
    if order[key] < last:
        return f"lists sample {key} out of the tar's order"
    why = _line_differs(line, samples[key])
    if why is None and set(parts) - set(samples[key]):
        return f"lists a component of {key} the tar does not hold"
    if why is None and samples[key][image_ext(parts)][1] == 0:
        return f"gives sample {key} an empty image"
    return why


def _verify_labels(shard_dir: Path, shard: dict) -> list[str]:
    if "labels" not in shard:
        return []
    data, problems = _read_listed(shard_dir, shard, "labels")
    if data is not None and len(data) != 4 * shard["count"]:
        problems.append(f"{shard['labels']}: {len(data)} bytes, {shard['count']} labels of 4 bytes are "
                        f"{4 * shard['count']}")
    return problems


def _kind(member: tarfile.TarInfo) -> str:
    return {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.DIRTYPE: "folder"}.get(
        member.type, f"special member (type {member.type!r})")


def _read_listed(shard_dir: Path, shard: dict, key: str) -> tuple[bytes | None, list[str]]:
    """(the bytes, the problems) of a shard's small file the manifest lists under `key` ("index":
    its `.idx`, "labels": its side file of labels), checked against the digest recorded beside it
    (`KEY_sha256`, where the manifest has one); None where the file is missing."""
    path = shard_dir / shard[key]
    if not path.is_file():
        return None, [f"{shard[key]}: missing"]
    data = path.read_bytes()
    digest = shard.get(f"{key}_sha256")
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        return data, [f"{shard[key]}: sha256 mismatch (edited or damaged)"]
    return data, []


def _read_index(shard_dir: Path, shard: dict) -> tuple[list[str] | None, list[str]]:
    """(the `.idx` lines, header first, the problems): the file against the manifest, its digest
    (packs since issue 43, every index) and its header's count; None where it is missing."""
    data, problems = _read_listed(shard_dir, shard, "index")
    if data is None:
        return None, problems
    lines = data.decode(errors="replace").splitlines()
    header = lines[0].split() if lines else []
    if header != ["v1.2", str(shard["count"])] or len(lines) - 1 != shard["count"]:
        problems.append(f"{shard['index']}: does not index {shard['count']} samples")
    return lines, problems


def _verify_index(lines: list[str], shard: dict, members: list[tarfile.TarInfo]) -> list[str]:
    """A packed shard's `.idx` lines against the tar's members: each line names the tar's next
    sample and gives each component's data offset and size as the tar holds them (what DALI and
    the cache read by)."""
    problems = []
    bad = [n for n, line in enumerate(lines[1:], start=2) if not _idx_line_ok(line)]
    if bad:
        problems.append(f"{shard['index']}: {len(bad)} lines do not parse as 'ext offset size name' "
                        f"(first: line {bad[0]})")
    expected = _index_lines(members)
    differ = []  # (line number, what differs)
    for n, line in enumerate(lines[1:], start=2):
        why = None if n in bad else _line_differs(line, expected[n - 2] if n - 2 < len(expected) else None)
        if why:
            differ.append((n, why))
    if differ:
        n, why = differ[0]
        more = f" ({len(differ) - 1} more lines differ)" if len(differ) > 1 else ""
        problems.append(f"{shard['index']}: line {n} {why}{more}: the index does not match its tar")
    return problems


def _index_lines(members: list[tarfile.TarInfo]) -> list[dict[str, tuple[int, int, str]]]:
    """What each .idx line should say, from the tar: {ext: (data offset, size, member name)} per
    sample, in tar order (the format ShardWriter and DALI's wds2idx write)."""
    samples: dict[str, dict[str, tuple[int, int, str]]] = {}
    for m in members:
        key, _, ext = m.name.partition(".")
        samples.setdefault(key, {})[ext] = (m.offset_data, m.size, m.name)
    return list(samples.values())


def _line_differs(line: str, expected: dict[str, tuple[int, int, str]] | None) -> str | None:
    """What in one parseable .idx line differs from the tar (None: nothing)."""
    if expected is None:
        return "lists a sample the tar does not hold"
    fields = line.split()
    listed = {fields[k]: (int(fields[k + 1]), int(fields[k + 2]), fields[k + 3]) for k in range(0, len(fields), 4)}
    for ext, (offset, size, name) in expected.items():
        if ext not in listed:
            continue  # a sample without jpg or label: the line parse check names it
        at, length, listed_name = listed[ext]
        if listed_name != name:
            return f"names {listed_name}, where the tar holds {name}"
        if at != offset:
            return f"puts {name} at offset {at}, the tar holds it at {offset}"
        if length != size:
            return f"gives {name} {length} bytes, the tar holds {size}"
    return None


def _idx_line_ok(line: str) -> bool:
    try:
        return set(parse_index_line(line)) == set(EXTENSIONS)
    except ValueError:
        return False
