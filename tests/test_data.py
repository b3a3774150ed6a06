"""Tiny ImageNet -> shards -> DALI / webdataset loaders, with real files and real DALI."""

import io
import json
import re
import shutil
import struct
import subprocess
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae_dist.config import DataConfig
from vae_dist.data.loaders import build_loader
from vae_dist.data.pack import PackOptions, pack
from vae_dist.data.shards import ShardSet, decode_label, load_manifest
from vae_dist.data.tinyimagenet import Source
from vae_dist.data.verify import verify
from vae_dist.errors import DataError

from .conftest import needs_dali, run_cli, with_loader

CPU = torch.device("cpu")


def _huge_png_header() -> bytes:
    """A PNG whose header claims 30000x30000 pixels, with a few bytes of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def messy_root(sample_root, tmp_path_factory) -> Path:
    """The sample tree plus planted problems and conversions, as the real data has."""
    root = tmp_path_factory.mktemp("messy") / "tiny"
    shutil.copytree(sample_root, root)
    wnid = (root / "wnids.txt").read_text().split()[0]
    images = root / "train" / wnid / "images"
    good = (images / f"{wnid}_0.JPEG").read_bytes()
    (images / "bad_truncated.JPEG").write_bytes(good[: len(good) // 2])
    (images / "bad_empty.JPEG").write_bytes(b"")
    (images / "bad_random.JPEG").write_bytes(np.random.default_rng(0).bytes(3000))
    (images / "bad_huge.JPEG").write_bytes(_huge_png_header())
    rgb = Image.open(io.BytesIO(good)).convert("RGB")
    rgb.convert("L").save(images / "conv_gray.JPEG", format="JPEG")
    rgb.convert("CMYK").save(images / "conv_cmyk.JPEG", format="JPEG")
    rgb.resize((80, 50)).save(images / "conv_size.JPEG", format="JPEG")
    rgb.save(images / "conv_png.JPEG", format="PNG")  # a PNG behind a .JPEG name
    return root


@pytest.fixture(scope="module")
def messy_pack(messy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("messy-shards")
    return out, pack(messy_root, out, PackOptions(shard_size=50, workers=2, seed=3))


def test_pack_counts_conversions_and_rejections(sample_root, messy_pack):
    out, manifest = messy_pack
    n_train = sum(1 for _ in (sample_root / "train").rglob("*.JPEG"))
    n_val = sum(1 for _ in (sample_root / "val" / "images").glob("*.JPEG"))
    assert manifest["splits"]["train"]["count"] == n_train + 4  # + gray, cmyk, resized, png
    assert manifest["splits"]["val"]["count"] == n_val
    conv = manifest["splits"]["train"]["converted"]
    assert conv["cmyk"] == 1 and conv["resized"] == 1 and conv["not_jpeg"] == 1
    # the sample set's own grayscale photos (2 of 10 classes) + the planted one
    assert conv["grayscale"] == 1 + 2 * 20
    rejected = {Path(r["path"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(rejected) == {"bad_truncated.JPEG", "bad_empty.JPEG", "bad_random.JPEG", "bad_huge.JPEG"}
    assert rejected["bad_empty.JPEG"] == "empty file"
    assert rejected["bad_random.JPEG"] == "not an image"
    assert "truncated" in rejected["bad_truncated.JPEG"]
    assert "too large" in rejected["bad_huge.JPEG"]
    assert all(r["path"].startswith("train/") for r in manifest["rejected"])  # relative to the root
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["splits"]["train"]["shards"][0]["sha256"] == manifest["splits"]["train"]["shards"][0]["sha256"]
    assert verify(out) == []


@needs_dali
def test_index_matches_dalis_wds2idx(messy_pack, tmp_path):
    wds2idx = shutil.which("wds2idx") or str(Path(__import__("sys").executable).parent / "wds2idx")
    out, manifest = messy_pack
    shard = manifest["splits"]["train"]["shards"][0]
    subprocess.run([wds2idx, str(out / shard["file"]), str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert (tmp_path / "ref.idx").read_text() == (out / shard["index"]).read_text()


def _collect(cfg, split, batch, world, train, epoch=0):
    keys = []
    for rank in range(world):
        loader = build_loader(ShardSet.open(cfg.shards), cfg, split, batch, rank=rank, world=world, device=CPU,
                              train=train, seed=5)
        imgs, labels = [], []
        for x, y in loader.epoch(epoch):
            imgs.append(x.clone())
            labels.append(y.clone())
        keys.append((torch.cat(imgs), torch.cat(labels), loader.steps_per_epoch, len(imgs)))
    return keys


def _packed_images(shard_dir, split):
    """Every packed sample decoded by PIL, in shard order, with labels."""
    import tarfile

    manifest = load_manifest(shard_dir)
    images, labels = [], []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(Path(shard_dir) / shard["file"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name in sorted(members, key=list(members).index):
            if name.endswith(".jpg"):
                img = np.array(Image.open(io.BytesIO(members[name])).convert("RGB"))
                images.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255)
                labels.append(decode_label(members[name[:-4] + ".label"]))
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.parametrize("loader", with_loader("dali", "webdataset"))
def test_val_epoch_reads_every_sample_once_with_pil_pixels(shards, loader):
    cfg = DataConfig(shards=str(shards), loader=loader, num_threads=2)
    ref_x, ref_y = _packed_images(shards, "val")
    (x, y, _, _), = _collect(cfg, "val", 16, 1, train=False)
    assert x.shape == ref_x.shape and x.dtype == torch.uint8  # the step makes floats
    x = x.float() / 255
    assert torch.equal(y, ref_y)  # unshuffled val: shard order
    assert (x - ref_x).abs().mean() < 2 / 255


@pytest.mark.parametrize("loader", with_loader("dali", "webdataset"))
def test_two_ranks_partition_the_split(shards, loader):
    cfg = DataConfig(shards=str(shards), loader=loader, num_threads=1)
    ref_x, ref_y = _packed_images(shards, "val")
    parts = _collect(cfg, "val", 16, 2, train=False)
    assert all(p[0].shape[0] > 0 for p in parts)
    # unshuffled val: rank 0 reads the first half, rank 1 the rest, so the union in rank
    # order is the whole split in shard order: every sample once, none twice
    union_x, union_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    assert torch.equal(union_y, ref_y)
    assert (union_x.float() / 255 - ref_x).abs().mean() < 2 / 255


@pytest.mark.parametrize("loader", with_loader("dali", "webdataset"))
def test_train_equal_steps_per_rank_and_reshuffled_each_epoch(shards, loader):
    cfg = DataConfig(shards=str(shards), loader=loader, num_threads=2, shuffle_buffer=64)
    manifest = load_manifest(shards)
    n = manifest["splits"]["train"]["count"]
    for world in (2, 3):
        parts = _collect(cfg, "train", 16, world, train=True)
        expected = (n // world) // 16
        assert [p[2] for p in parts] == [expected] * world  # declared
        assert [p[3] for p in parts] == [expected] * world  # delivered
    e0 = _collect(cfg, "train", 16, 1, train=True, epoch=0)[0]
    e1 = _collect(cfg, "train", 16, 1, train=True, epoch=1)[0]
    assert not torch.equal(e0[1], e1[1])  # another order
    assert sorted(e0[1].tolist()) != e0[1].tolist()  # and a shuffled one


@needs_dali
def test_resume_position_skips_batches(shards):
    cfg = DataConfig(shards=str(shards), loader="dali", num_threads=1, flip=False)
    loader = build_loader(ShardSet.open(cfg.shards), cfg, "train", 16, rank=0, world=1, device=CPU, train=True, seed=2)
    full = [y.clone() for _, y in loader.epoch(4)]
    tail = [y.clone() for _, y in loader.epoch(4, skip=3)]
    assert len(tail) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(full[3:], tail))  # the same epoch, deterministically


def test_zip_source_packs_like_the_folder(sample_root, shards, tmp_path):
    zpath = tmp_path / "tiny.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(sample_root.rglob("*")):
            if p.is_file():
                zf.write(p, f"tiny-imagenet-200/{p.relative_to(sample_root).as_posix()}")
        zf.writestr("../evil.txt", "x")  # never extracted, and reported
    m = pack(zpath, tmp_path / "out", PackOptions(shard_size=64, workers=2))
    ref = load_manifest(shards)
    assert m["splits"]["train"]["count"] == ref["splits"]["train"]["count"]
    assert [s["sha256"] for s in m["splits"]["val"]["shards"]] == [s["sha256"] for s in ref["splits"]["val"]["shards"]]
    assert any(r["path"] == "../evil.txt" and "unsafe" in r["reason"] for r in m["rejected"])
    assert not (tmp_path / "evil.txt").exists()


def test_repack_replaces_previous_result(sample_root, tmp_path):
    out = tmp_path / "out"
    pack(sample_root, out, PackOptions(shard_size=20, workers=1))
    assert len(list(out.glob("train-*.tar"))) == 10
    m = pack(sample_root, out, PackOptions(shard_size=100, workers=1, splits=("train",)))
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not list(out.glob(".pack-staging-*")) and not list(out.glob("*.partial"))
    assert set(m["splits"]) == {"train"} and verify(out) == []


def test_verify_catches_truncated_and_missing_shards(shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    first = bad / "train-000000.tar"
    first.write_bytes(first.read_bytes()[:5000])
    (bad / "train-000001.tar").unlink()
    problems = verify(bad)
    assert any("train-000000.tar" in p and "sha256" in p for p in problems)
    assert any(p == "train-000001.tar: missing" for p in problems)
    r = run_cli("verify", str(bad))  # each problem on stdout, then one error line; exit 2 (1 is a crash)
    assert r.returncode == 2 and "train-000001.tar: missing" in r.stdout, r.stderr
    assert r.stderr.strip().splitlines() == [f"vae-dist: error: {bad}: {len(problems)} problems with the shards "
                                             f"(listed above): pack them again from the source images"]
    assert run_cli("verify", str(shards)).returncode == 0
    r = run_cli("verify", str(tmp_path))  # a folder without a manifest
    assert r.returncode == 2 and r.stderr.strip() == \
        f"vae-dist: error: no manifest.json in {tmp_path} (make shards with `vae-dist pack`)"
    r = run_cli("verify", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.strip() == f"vae-dist: error: shard folder not found: {tmp_path / 'missing'}"
    # and training refuses the corrupt folder up front, in one line
    with pytest.raises(DataError, match="train-000000.tar"):
        build_loader(ShardSet.open(bad), DataConfig(shards=str(bad)), "train", 8, rank=0, world=1, device=CPU,
                     train=True, seed=0)
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["image_size"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"^corrupt .*manifest.json: no valid 'image_size' \(pack the shards again\)$"):
        ShardSet.open(bad)


def test_a_missing_tar_or_idx_is_one_line_at_the_loaders_start(shards, tmp_path):
    """The loaders' start-up check (ShardSet.files) names the file a shard lacks: its .idx, or its tar."""
    for missing, what in (("train-000001.idx", "shard index"), ("train-000001.tar", "shard")):
        bad = tmp_path / missing
        shutil.copytree(shards, bad)
        (bad / missing).unlink()
        with pytest.raises(DataError, match=f"^missing {what} {re.escape(missing)} in {re.escape(str(bad))}$"):
            ShardSet.open(bad).files("train")


def test_bad_sources_give_one_line_errors(tmp_path):
    (tmp_path / "corrupt.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    (tmp_path / "notti").mkdir()
    (tmp_path / "notti" / "hello.txt").write_text("hi")
    for src, words in ((tmp_path / "corrupt.zip", "corrupt"), (tmp_path / "notti", "no images in"),
                       (tmp_path / "missing", "not found")):
        r = run_cli("pack", str(src), str(tmp_path / "o"))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], r.stderr
    with pytest.raises(DataError):
        Source(tmp_path / "notti")


def test_sample_data_cli_and_zip_are_deterministic(tmp_path):
    for name in ("a", "b"):
        r = run_cli("sample-data", str(tmp_path / name), "--train-per-class", "2", "--val-per-class", "1",
                    "--test", "1", "--zip")
        assert r.returncode == 0, r.stderr
    fa, fb = sorted((tmp_path / "a").rglob("*.JPEG")), sorted((tmp_path / "b").rglob("*.JPEG"))
    assert [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb] and len(fa) == 10 * 2 + 10 + 1
    assert zipfile.ZipFile(tmp_path / "a.zip").testzip() is None


def test_partition_rules():
    from vae_dist.data.partition import rank_sample_range, steps_per_epoch

    parts = [rank_sample_range(130, r, 3) for r in range(3)]
    assert parts == [(0, 43), (43, 86), (86, 130)]  # contiguous, covering, sizes differ by <= 1
    assert [steps_per_epoch(130, 10, r, 3, train=True) for r in range(3)] == [4, 4, 4]  # the smallest part decides
    assert [steps_per_epoch(130, 10, r, 3, train=False) for r in range(3)] == [5, 5, 5]
    with pytest.raises(DataError, match="fewer than one batch of 64"):
        steps_per_epoch(127, 64, 0, 2, train=True)


def _ids(images: torch.Tensor, reference: dict) -> list[int]:
    """Which samples a batch holds: each uint8 image looked up among the split's images."""
    return [reference[img.numpy().tobytes()] for img in images]


@pytest.fixture(scope="module")
def one_shard(sample_root, tmp_path_factory):
    """The train split in a single tar: no shard order to shuffle."""
    out = tmp_path_factory.mktemp("one-shard")
    pack(sample_root, out, PackOptions(shard_size=1000, workers=2, splits=("train",)))
    return out


@pytest.mark.parametrize("loader", with_loader("webdataset", "dali"))
def test_train_epochs_cover_every_sample_and_mix_the_ranks(one_shard, loader):
    """Each epoch every sample but the remainder cut to whole batches, none twice; the
    remainder moves between epochs, and a rank's samples change with the epoch."""
    shards = one_shard
    cfg = DataConfig(shards=str(shards), loader=loader, num_threads=2, flip=False, shuffle_buffer=64)
    in_order = build_loader(ShardSet.open(cfg.shards), cfg, "train", 16, rank=0, world=1, device=CPU, train=False, seed=5)
    images = torch.cat([x for x, _ in in_order.epoch(0)])
    reference = {img.numpy().tobytes(): i for i, img in enumerate(images)}  # sample id: place in shard order
    n = len(reference)
    assert n == images.shape[0] == load_manifest(shards)["splits"]["train"]["count"] == 200  # all distinct
    seen, by_rank = set(), []
    for epoch in range(4):
        parts = [_ids(x, reference) for x, _, _, _ in _collect(cfg, "train", 16, 2, train=True, epoch=epoch)]
        assert [len(p) for p in parts] == [96, 96]  # 6 batches of 16 each
        assert len(set(parts[0]) | set(parts[1])) == 192  # none twice within the epoch, across ranks too
        seen |= set(parts[0]) | set(parts[1])
        by_rank.append([set(p) for p in parts])
    assert seen == set(range(n)), f"{n - len(seen)} samples never seen in 4 epochs"
    assert by_rank[0][0] & by_rank[1][1]  # rank 0's samples of epoch 0 are partly rank 1's in epoch 1
    assert by_rank[0][0] != by_rank[1][0]


@pytest.fixture(scope="module")
def awkward_pack(sample_root, tmp_path_factory):
    """The sample tree plus names that clash as sample keys or break the .idx format."""
    root = tmp_path_factory.mktemp("awkward") / "tiny"
    shutil.copytree(sample_root, root)
    first, second = (root / "wnids.txt").read_text().split()[:2]
    a, b = root / "train" / first / "images", root / "train" / second / "images"
    jpeg = (a / f"{first}_0.JPEG").read_bytes()
    for path in (a / "dup.JPEG", b / "dup.JPEG", a / "x.y.JPEG", a / "x_y.JPEG", a / "with space.JPEG"):
        path.write_bytes(jpeg)
    out = tmp_path_factory.mktemp("awkward-shards")
    return out, pack(root, out, PackOptions(shard_size=64, workers=2))


@pytest.mark.parametrize("loader", with_loader("dali", "webdataset"))
def test_clashing_and_spaced_names_pack_verify_and_load(awkward_pack, loader):
    out, manifest = awkward_pack
    assert manifest["splits"]["train"]["count"] == 205 and not manifest["rejected"]
    assert verify(out) == []
    cfg = DataConfig(shards=str(out), loader=loader, num_threads=1)
    ((x, y, _, batches),) = _collect(cfg, "train", 16, 1, train=False)
    assert x.shape[0] == 205 and batches == 13


def test_verify_names_duplicate_and_spaced_keys(tmp_path):
    from vae_dist.data.shards import ShardWriter, write_json_atomic

    tar = tmp_path / "train-000000.tar"
    writer = ShardWriter(tar)
    writer.write("a", b"\xff\xd8jpeg", 0)
    writer.write("a", b"\xff\xd8jpeg", 1)  # the same key twice
    shard = writer.close()
    write_json_atomic(tmp_path / "manifest.json", {"image_size": 64, "splits": {"train": {"count": 2, "shards": [shard]}}})
    problems = verify(tmp_path)
    assert any("sample key 'a' appears twice" in p for p in problems), problems
    with pytest.raises(DataError, match="may hold only letters, digits"):
        ShardWriter(tmp_path / "train-000001.tar").write("with space", b"\xff\xd8", 0)


def test_an_index_line_split_by_a_spaced_key_is_named_by_verify_and_the_dali_index(tmp_path):
    """What a pack from before keys were made safe leaves: 'x y.jpg' splits its .idx line."""
    from vae_dist.data.dali import ShardIndex
    from vae_dist.data.shards import ShardWriter, write_json_atomic

    writer = ShardWriter(tmp_path / "train-000000.tar")
    writer.write("xy", b"\xff\xd8jpeg", 0)
    shard = writer.close()
    idx = tmp_path / shard["index"]
    idx.write_text(idx.read_text().replace("xy.", "x y."))
    write_json_atomic(tmp_path / "manifest.json", {"image_size": 64, "splits": {"train": {"count": 1, "shards": [shard]}}})
    assert any("1 lines do not parse as 'ext offset size name' (first: line 2)" in p for p in verify(tmp_path))
    with pytest.raises(DataError, match="line 2 does not parse .*a sample key with a space.*pack the data again"):
        ShardIndex([str(tmp_path / shard["file"])], [str(idx)])


@pytest.mark.parametrize("loader", with_loader("dali", "webdataset"))
def test_a_limit_takes_the_first_samples_for_any_number_of_ranks(shards, loader):
    cfg = DataConfig(shards=str(shards), loader=loader, num_threads=1)
    ref_x, ref_y = _packed_images(shards, "val")
    for world in (1, 2, 3):
        parts = [build_loader(ShardSet.open(cfg.shards), cfg, "val", 8, rank=r, world=world, device=CPU, train=False,
                              seed=0, limit=20)
                 for r in range(world)]
        labels = torch.cat([y for loader_ in parts for _, y in loader_.epoch(0)])
        assert torch.equal(labels, ref_y[:20]), world  # the first 20, split among the ranks
