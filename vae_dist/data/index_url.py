"""`vae-dist index URL`: the tars at an HTTP(S) or S3 URL described as a local folder's are
(vae_dist.data.index), each read once over the link.

Which tars: an s3:// folder URL lists its prefix (the objects ending in .tar directly under it).
HTTP has no standard listing, so the tars are named in WebDataset's brace notation
(`https://host/set/{00000..00009}.tar`, `.../{a,b}.tar`; s3:// takes it too), or read off the
server's HTML index of a folder URL (an autoindex: Python's http.server, nginx's `autoindex on`).

Each tar is downloaded into a temporary folder (its size checked against what the server
announced, its sha256 computed on arrival), scanned as a local tar, and deleted: `jobs` tars
are on disk at a time, fetched on as many threads. The manifest records each tar's name, bytes,
sha256 and count as a local index does, so a reader checks each tar it fetches against it.

Where the index goes: `--out DIR`, a local folder (its manifest's `shard_base` is the tars'
folder URL), or, without --out, beside the tars at an s3:// URL: an old manifest.json there
goes first, then the .idx and label files are uploaded, manifest.json last, so a reader never
sees a manifest naming files not yet there. An http(s) source cannot be written: --out it is.
"""

from __future__ import annotations

import itertools
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from vae_dist.data.index import (
    IndexOptions,
    check_options,
    check_out,
    index_files,
    scan_all,
    scan_tar,
    stale_index_files,
    write_index,
)
from vae_dist.data.remote import MANIFEST, Remote, S3Remote, _Missing, folder_url, is_url, open_remote
from vae_dist.data.shards import is_indexed
from vae_dist.errors import DataError, UserError, counted

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_MAX_NAMES = 1_000_000  # a pattern naming more tars than this is a typo, not a set


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace notation expanded, as its `braceexpand` does: `{00000..00009}` a range
    (zero-padded to the first bound's width where it starts with 0), `{a,b}` a list; several
    groups give every combination, in order."""
    match = _BRACE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise UserError(f"{pattern}: unbalanced or nested braces (WebDataset's notation: {{00000..00009}} or {{a,b}})")
        return [pattern]
    body = match.group(1)
    bounds = _RANGE.match(body)
    if bounds:
        first, last = bounds.groups()
        width = len(first) if first.lstrip("-").startswith("0") and len(first.lstrip("-")) > 1 else 0
        lo, hi = int(first), int(last)
        step = 1 if hi >= lo else -1
        if abs(hi - lo) >= _MAX_NAMES:
            raise UserError(f"{pattern}: {{{body}}} names {abs(hi - lo) + 1} tars, more than {_MAX_NAMES}")
        choices = [str(n).zfill(width) for n in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise UserError(f"{pattern}: {{{body}}} is neither a range {{FIRST..LAST}} nor a list {{a,b}}")
    head, tail = pattern[:match.start()], expand_braces(pattern[match.end():])
    return [head + choice + rest for choice, rest in itertools.product(choices, tail)]


def split_source(url: str) -> tuple[str, list[str] | None]:
    """(the tars' folder URL, the tar names a brace pattern gives, or None: list the folder)."""
    url = url.strip()
    if "{" not in url and "}" not in url:
        return folder_url(url), None
    folder, _, pattern = url.rpartition("/")
    if "{" in folder or "}" in folder:
        raise UserError(f"{url}: braces only in the tar names (the URL's last part): an index describes "
                        f"the tars of one folder")
    names = list(dict.fromkeys(expand_braces(pattern)))  # once each, in the pattern's order
    if any(not name or name in (".", "..") for name in names):
        raise UserError(f"{url}: the pattern gives an empty tar name")
    return folder + "/", names


def source_folder(shards: str) -> str:
    """Where the tars of `shards` (a folder, a folder URL or a brace pattern) are: for the messages."""
    return split_source(shards)[0] if is_url(shards) else shards


def list_url_tars(remote: Remote, names: list[str] | None) -> list[tuple[str, int | None]]:
    """[(tar name, bytes or None where unknown)]: the brace pattern's names, or the folder's
    listing; none is one line."""
    if names is not None:
        return [(name, None) for name in names]
    found = remote.list(".tar")
    if not found:
        how = ("an S3 prefix's objects ending in .tar, directly under it" if isinstance(remote, S3Remote) else
               f"the links ending in .tar of the server's index of the folder, or name them in WebDataset's brace "
               f"notation, e.g. '{remote.url}{{00000..00009}}.tar'")
        raise DataError(f"no .tar files at {remote.url}: `vae-dist index` describes {how}")
    return found


def index_url(url: str, out: str | Path | None = None, opts: IndexOptions | None = None, *, retries: int = 5,
              backoff: float = 0.5, jobs: int = 4) -> dict:
    """Describes the tars at `url` (a folder URL or a brace pattern) into the local folder `out`,
    or beside them (an s3:// source without `out`); returns the manifest."""
    opts = opts or IndexOptions()
    check_options(opts)
    for option, value in (("--retries", retries), ("--jobs", jobs)):
        if value < 1:
            raise UserError(f"{option} must be 1 or more, got {value}")
    folder, names = split_source(url)
    remote = open_remote(folder, retries=retries, backoff=backoff)
    beside = out is None
    if beside and not isinstance(remote, S3Remote):
        raise UserError(f"{folder} is read-only (an http(s) server cannot be written): give --out DIR, a local "
                        f"folder for the index (its manifest.json then says where the tars are)")
    old = _check_beside(remote) if beside else None  # before hours of downloads, not after
    tars = list_url_tars(remote, names)
    target = check_out(None, Path(out)) if not beside else Path(tempfile.mkdtemp(prefix="vae-dist-index-"))
    work = Path(tempfile.mkdtemp(prefix="vae-dist-index-tars-"))  # `jobs` tars at a time, each deleted when scanned
    sizes = dict(tars)
    t0 = time.perf_counter()

    def fetch_and_scan(name: str):
        local = work / name
        try:
            remote.download(name, local, size=sizes[name])
            return scan_tar(local)
        except _Missing:  # a brace pattern's name the server lacks (a listing names only what is there)
            raise DataError(f"{remote.describe(name)}: no such object (the pattern names a tar the server "
                            f"does not hold)") from None
        finally:
            local.unlink(missing_ok=True)

    try:
        scans, damaged = scan_all([name for name, _ in tars], fetch_and_scan, jobs=jobs)
        manifest = write_index(target, scans, damaged, opts, source=url.strip(), shard_base=None if beside else folder,
                               t0=t0)
        if beside:
            _upload_index(target, remote, manifest, old)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if beside:
            shutil.rmtree(target, ignore_errors=True)
    return manifest


def _check_beside(remote: Remote) -> dict | None:
    """Before writing beside the tars: a manifest.json there must be one index wrote (a packed
    set's is not replaced), and the prefix must take a write (credentials that only read are one
    line now). Returns the old manifest (its index files that the new one lacks are removed)."""
    if remote.exists(MANIFEST):
        old = remote.read_json(MANIFEST)
        if not isinstance(old, dict) or not is_indexed(old):
            raise UserError(f"{remote.url}{MANIFEST} is not one `vae-dist index` wrote (a packed set's, or another "
                            f"tool's): index into a local folder with --out DIR")
    else:
        old = None
    try:
        remote.probe_write("index")
    except DataError as e:
        raise UserError(f"cannot write into {remote.url} ({e}): give --out DIR, a local folder for the "
                        f"index (its manifest.json then says where the tars are)") from None
    return old


def _upload_index(folder: Path, remote: Remote, manifest: dict, old: dict | None) -> None:
    """The index written in `folder` to the tars' prefix (Remote.publish: the old manifest.json
    first taken away, the .idx and label files, the old index's files this one does not name
    removed, manifest.json last). A reader so sees the old index whole, none, or the new one whole."""
    files = sorted(index_files(manifest))

    def uploaded(n: int, _name: str) -> None:
        if n % 100 == 0 or n == len(files):
            print(f"index: uploaded {n}/{counted(len(files), 'index file')} to {remote.url}", file=sys.stderr,
                  flush=True)

    remote.publish(folder, files, stale=stale_index_files(old or {}, manifest), on_upload=uploaded)
