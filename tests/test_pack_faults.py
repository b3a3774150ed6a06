"""`vae-dist pack` against what a careful tester did to it (issue 43): an output folder holding
the user's files, links in the source, the output inside the source, a full disk, SIGTERM and
SIGKILL, and an image that is small on disk but huge decoded."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vae_dist.data.images import to_shard_jpeg
from vae_dist.data.pack import PackOptions, pack
from vae_dist.data.shards import load_manifest
from vae_dist.data.verify import verify
from vae_dist.errors import UserError

from .conftest import run_cli, tmpfs

OPTS = dict(workers=1, val_fraction=0)


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> Path:
    """catA and catB, 4 noisy 64x64 JPEGs each (~12 KB apiece: a few fill a small disk)."""
    root = tmp_path_factory.mktemp("src") / "pets"
    rng = np.random.default_rng(0)
    for cls in ("catA", "catB"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / cls / f"{cls}{i}.jpg",
                                                                                 quality=95)
    return root


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# issue 43, case 1: pack deleted the user's own *-*.tar / *-*.idx files in OUT
def test_pack_refuses_an_output_folder_holding_files_no_pack_wrote(two_classes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("my-backup.tar", "photos-2024.idx", "notes.txt"):
        (out / name).write_text(f"the user's {name}")
    before = digests(out)
    r = run_cli("pack", str(two_classes), str(out), "--workers", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (
        f"vae-dist: error: pack output folder {out} holds 3 files no earlier pack wrote (my-backup.tar, notes.txt, "
        "photos-2024.idx): pack writes into an empty folder, or into one an earlier pack wrote (replacing the files "
        "its manifest.json names); choose another folder, or move them out")
    assert digests(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)  # no staging either

    # a manifest does not make pack replace what is not a shard of its own: a forged or edited
    # one naming the user's file leaves it foreign; a folder in OUT is foreign too (named with a '/')
    (out / "notes.txt").unlink()
    (out / "photos-2024.idx").unlink()
    (out / "old").mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "vae-dist-shards/1",
                                                   "splits": {"train": {"shards": [{"file": "my-backup.tar"}]}}}))
    with pytest.raises(UserError, match=re.escape(f"{out} holds 1 file and 1 folder no earlier pack wrote "
                                                  "(my-backup.tar, old/): ")):
        pack(two_classes, out, PackOptions(**OPTS))
    assert (out / "my-backup.tar").read_text() == "the user's my-backup.tar"
    # ... and a manifest.json that is not a pack's (no vae-dist format) is the user's own file
    (out / "my-backup.tar").unlink()
    (out / "old").rmdir()
    (out / "manifest.json").write_text(json.dumps({"project": "my notes"}))
    with pytest.raises(UserError, match=re.escape(f"{out} holds 1 file no earlier pack wrote (manifest.json): ")):
        pack(two_classes, out, PackOptions(**OPTS))
    assert json.loads((out / "manifest.json").read_text()) == {"project": "my notes"}


# issue 43, case 1: what packing again replaces is what the earlier pack's manifest names
def test_packing_again_replaces_only_what_the_earlier_pack_wrote(two_classes, tmp_path):
    out = tmp_path / "out"
    pack(two_classes, out, PackOptions(shard_size=2, **OPTS))
    assert len(list(out.glob("train-*.tar"))) == 4
    (out / "README.md").write_text("# my shards")  # as the repository's own shards/README.md
    (out / ".gitignore").write_text("*.tar\n")
    pack(two_classes, out, PackOptions(shard_size=3, **OPTS))
    assert sorted(p.name for p in out.iterdir()) == [
        ".gitignore", "README.md", "manifest.json", "train-000000.idx", "train-000000.tar", "train-000001.idx",
        "train-000001.tar", "train-000002.idx", "train-000002.tar"]
    assert verify(out) == []

    # a pack killed halfway through its swap: the old manifest gone, a new shard in, the record
    # of the swap left. The next pack knows those files as pack's and replaces them whole.
    (out / "manifest.json").unlink()
    (out / "val-000000.tar").write_bytes(b"half a swap")
    (out / ".pack-swap.json").write_text(json.dumps({"files": ["manifest.json", "train-000000.idx", "train-000000.tar",
                                                               "train-000001.idx", "train-000001.tar", "train-000002.idx",
                                                               "train-000002.tar", "val-000000.tar"]}))
    pack(two_classes, out, PackOptions(shard_size=8, **OPTS))
    assert sorted(p.name for p in out.iterdir()) == [".gitignore", "README.md", "manifest.json", "train-000000.idx",
                                                     "train-000000.tar"]


# issue 43, case 6: a link loop in a class folder packed catB's images a second time as catA
def test_pack_follows_no_link_out_of_the_tree_or_into_a_loop(two_classes, tmp_path):
    src = tmp_path / "pets"
    shutil.copytree(two_classes, src)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(src / "catA/catA0.jpg", outside / "x.jpg")
    (src / "catA/loop").symlink_to("..")  # the tester's: the whole tree again, inside catA
    (src / "catA/b").symlink_to("../catB")  # catB's images again, as catA
    (src / "catA/away").symlink_to(outside)
    (src / "catA/away.jpg").symlink_to(outside / "x.jpg")
    (src / "catB/alias.jpg").symlink_to("catB0.jpg")  # a file inside the tree: read, as the file it names
    m = pack(src, tmp_path / "out", PackOptions(**OPTS))
    assert m["classes"] == ["catA", "catB"]
    assert m["splits"]["train"]["count"] == 9  # 4 + 4 + the alias
    assert m["rejected"] == [
        {"path": "catA/away", "reason": "link out of the source tree (not followed)"},
        {"path": "catA/away.jpg", "reason": "link out of the source tree (not followed)"},
        {"path": "catA/b", "reason": "link to a folder elsewhere in the source tree (not followed: its files are read "
                                     "where they are)"},
        {"path": "catA/loop", "reason": "link loop: a link to a folder that holds it (not followed)"}]


# issue 43, case 7: OUT inside SRC, packed twice, added a class "shards" with no images
def test_pack_into_a_folder_inside_its_source_leaves_that_folder_out(two_classes, tmp_path):
    src = tmp_path / "pets"
    shutil.copytree(two_classes, src)
    out = src / "shards"
    out.mkdir()  # there before the first pack too
    first = pack(src, out, PackOptions(**OPTS))
    second = pack(src, out, PackOptions(**OPTS))
    for m in (first, second):
        assert m["classes"] == ["catA", "catB"] and m["splits"]["train"]["count"] == 8
        assert m["rejected"] == [{"path": "shards/", "reason": "the pack's output folder (inside the source: not read)"}]


# issue 43, case 14: a full disk ended pack in an OSError traceback (the old shards stayed)
def test_pack_onto_a_full_disk_is_one_line_and_keeps_the_previous_shards(two_classes, tmp_path):
    with tmpfs(tmp_path / "small", "size=1m") as small:
        out = small / "out"
        one = tmp_path / "one"
        shutil.copytree(two_classes / "catA", one / "catA", ignore=lambda d, names: names[1:])
        assert run_cli("pack", str(one), str(out), "--workers", "1", "--val-fraction", "0").returncode == 0
        before = digests(out)
        (small / "filler").write_bytes(bytes(shutil.disk_usage(small).free - 24 * 1024))  # 8 images need ~100 KB

        r = run_cli("pack", str(two_classes), str(out), "--workers", "1", "--val-fraction", "0")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert re.fullmatch(rf"vae-dist: error: no space left on the device of pack output folder {out}: "
                            r"\d+ KB free there once the \d+ KB this pack had written were removed; "
                            rf"the previous shards in {out} are untouched\n", r.stderr), r.stderr
        assert digests(out) == before and verify(out) == []
        assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no staging folder, no .partial


# issue 43, case 15: SIGKILL (and SIGTERM, before) left .pack-staging-PID folders no pack removed
def test_pack_removes_the_staging_folders_of_dead_packs_only(two_classes, tmp_path):
    out = tmp_path / "out"
    pack(two_classes, out, PackOptions(**OPTS))
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process that ended: its PID names a dead pack
    host = socket.gethostname()
    stale = [f".pack-staging-{host}-{gone.pid}", f".pack-staging-{gone.pid}"]  # this pack's name, and older packs'
    kept = [f".pack-staging-{host}-{os.getppid()}",  # a pack still running
            f".pack-staging-{host}x-{gone.pid}"]  # another host's: its process cannot be seen from here
    for name in stale + kept:
        (out / name).mkdir()
        (out / name / "train-000000.tar.partial").write_bytes(bytes(1000))
    pack(two_classes, out, PackOptions(**OPTS))
    assert sorted(p.name for p in out.glob(".pack-staging-*")) == sorted(kept)


# issue 43, case 15: SIGTERM printed a 68-line BrokenPipeError traceback and left the staging folder
@pytest.mark.slow
def test_pack_stopped_by_sigterm_cleans_up_in_one_line(two_classes, tmp_path):
    src = tmp_path / "big"
    src.mkdir()
    ramp = Image.linear_gradient("L").resize((3000, 3000))  # ~0.1 s to decode and shrink, tiny on disk
    Image.merge("RGB", [ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp]).save(src / "x00.png", compress_level=1)
    for i in range(1, 80):  # ~4 s of work on 2 processes: still running when the signal comes
        os.link(src / "x00.png", src / f"x{i:02d}.png")
    out = tmp_path / "out"
    pack(two_classes, out, PackOptions(**OPTS))
    before = digests(out)

    proc = subprocess.Popen([sys.executable, "-m", "vae_dist", "pack", str(src), str(out), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(out.glob(".pack-staging-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # the workers are at work
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + 15, (proc.returncode, stdout, stderr)
    assert stderr == f"vae-dist: pack stopped by SIGTERM: its staging folder is removed, {out} holds what it held before\n"
    assert digests(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    assert load_manifest(out)["splits"]["train"]["count"] == 8


def _peak_memory_added(data: bytes, size: int) -> tuple[float, str | None]:
    """(MiB, the reason) of to_shard_jpeg(data, size) run in a forked child, as in a pack worker:
    its peak RSS (VmHWM, reset first through clear_refs) above its RSS before the call."""
    def status(key: str) -> float:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reports, and leaves without running pytest's exit code
        try:
            Path("/proc/self/clear_refs").write_text("5")
            base = status("VmRSS")
            jpeg, reason, _ = to_shard_jpeg(data, size)
            os.write(write, json.dumps([status("VmHWM") - base, reason]).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        added, reason = json.loads(f.read())
    return added, reason


# issue 43, case 21: an 8192x8192 RGBA PNG of 277 KB packed with 1.15 GB peak in one worker
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux's /proc")
def test_a_large_png_packs_in_little_more_memory_than_its_decoded_pixels(tmp_path):
    side = 3072  # 9.4 M pixels: 36 MiB decoded as RGBA (the tester's 8192 took 256 MiB: 835 MB added, now 265)
    ramp = Image.linear_gradient("L").resize((side, side))
    png = io.BytesIO()
    Image.merge("RGBA", [ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp, ramp]).save(png, "PNG", compress_level=1)
    decoded = side * side * 4 / 2**20
    added, reason = _peak_memory_added(png.getvalue(), 64)
    assert reason is None
    # the decoded image and a strip at a time; converted whole, the copies took 3.2x the decoded size
    assert added < 1.4 * decoded, f"{added:.0f} MiB added to decode {decoded:.0f} MiB"
