"""`vae-dist verify`: every shard against manifest.json, every problem one line.

Checks what a loader's start-up check cannot afford: the sha256 of each tar, every sample
complete and unique, every `.idx` line parseable (its measured cost: the README, data.verify).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from vae_dist.data.shards import EXTENSIONS, is_safe_key, load_manifest, parse_index_line
from vae_dist.files import sha256_file


def verify(shard_dir: str | Path, manifest: dict | None = None) -> list[str]:
    """Every problem with the shards against their manifest (`manifest`: already read, by a
    ShardSet), one line each ([] = all good); a missing folder or manifest is a DataError."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir) if manifest is None else manifest
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
        if not is_safe_key(key):
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
