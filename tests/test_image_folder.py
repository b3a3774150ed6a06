"""Your own images: class-folder, pre-split and flat trees packed at any size, then trained on,
pictured and scored at 128x128. Real files in every format Pillow reads, real DALI (CPU), real tars."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vae_dist.data.pack import PackOptions, pack
from vae_dist.data.shards import decode_label
from vae_dist.data.verify import verify
from vae_dist.errors import DataError

from .conftest import TINY_MODEL, needs_loader, run_cli, with_loader


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB picture (JPEG-friendly, unlike noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def halves(w: int, h: int, left, right, mode="RGB") -> Image.Image:
    im = Image.new(mode, (w, h), right)
    im.paste(Image.new(mode, (w // 2, h), left), (0, 0))
    return im


def samples(shard_dir: Path, split: str) -> dict[str, tuple[np.ndarray, int]]:
    """{source stem: (pixels HxWx3, label)} of every sample of a split, read back from the tars."""
    out, parts = {}, {}
    for tar in sorted(shard_dir.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                key, ext = m.name.split(".", 1)
                parts.setdefault(key, {})[ext] = t.extractfile(m).read()
    for key, p in parts.items():
        stem = key.split("_", 1)[1]
        out[stem] = (np.asarray(Image.open(io.BytesIO(p["jpg"]))), decode_label(p["label"]))
    return out


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory) -> Path:
    """Three classes with nested folders, every format and mode, and the files a real folder has."""
    root = tmp_path_factory.mktemp("own") / "pets"
    for d in ("cats/indoor/deeper", "dogs", "birds", ".ipynb_checkpoints"):
        (root / d).mkdir(parents=True)
    photo(300, 200, 1).save(root / "cats/a.jpg", quality=90)
    halves(80, 80, (0, 0, 0, 255), (0, 0, 0, 0), "RGBA").save(root / "cats/indoor/rgba.png")  # right half transparent
    photo(90, 120, 2).save(root / "cats/indoor/deeper/c.webp")
    photo(70, 70, 3).convert("L").save(root / "dogs/gray.bmp")
    gradient = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(gradient).save(root / "dogs/sixteen.tiff")  # mode I;16: mid-gray on average
    frames = [Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))]
    frames[0].save(root / "dogs/anim.gif", save_all=True, append_images=frames[1:])  # first frame red
    photo(50, 60, 4).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "birds/palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown rotated 90 degrees clockwise
    halves(64, 32, (255, 0, 0), (0, 0, 255)).save(root / "birds/rotated.jpg", exif=exif.tobytes(), quality=95)
    (root / "birds/notes.txt").write_text("not a picture")
    (root / "birds/empty.jpg").write_bytes(b"")
    (root / "README.md").write_text("# my pets")
    (root / ".DS_Store").write_bytes(b"\0\0")
    photo(40, 40, 5).save(root / ".ipynb_checkpoints/a-checkpoint.jpg")
    return root


@pytest.fixture(scope="module")
def class_pack(class_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("own-shards-32")
    return out, pack(class_tree, out, PackOptions(shard_size=4, workers=2, image_size=32, val_fraction=0.2))


def test_class_folders_pack_every_format_upright_at_32(class_pack):
    out, manifest = class_pack
    assert manifest["image_size"] == 32
    assert manifest["layout"]["name"] == "classes" and manifest["layout"]["presplit"] is False
    assert manifest["layout"]["val"].startswith("held out: 0.2")
    assert manifest["classes"] == ["birds", "cats", "dogs"]  # sorted, as torchvision's ImageFolder
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    assert rejected == {"birds/notes.txt": "not an image", "birds/empty.jpg": "empty file",
                        "README.md": "not in a class folder", ".DS_Store": "hidden file or folder (not read)",
                        ".ipynb_checkpoints/": "hidden file or folder (not read)"}
    got = {**samples(out, "train"), **samples(out, "val")}
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == len(got) == 8
    assert manifest["splits"]["val"]["count"] == 2  # round(0.2 x 8)
    labels = {stem: label for stem, (_, label) in got.items()}
    assert labels == {"a": 1, "rgba": 1, "c": 1, "gray": 2, "sixteen": 2, "anim": 2, "palette": 0, "rotated": 0}
    assert all(pixels.shape == (32, 32, 3) for pixels, _ in got.values())
    rotated = got["rotated"][0].astype(int)
    assert rotated[:12, :, 0].mean() > 200 > rotated[:12, :, 2].mean()  # red on top: the EXIF turn applied
    assert rotated[-12:, :, 2].mean() > 200 > rotated[-12:, :, 0].mean()
    assert 100 < got["sixteen"][0].mean() < 155  # scaled from 16 bits, not clipped to white
    rgba = got["rgba"][0].astype(int)
    assert rgba[:, :12].mean() < 40 and rgba[:, -12:].mean() > 215  # transparent pixels on white
    anim = got["anim"][0].astype(int)
    assert anim[..., 0].mean() > 200 > anim[..., 2].mean()  # the first frame
    conv = converted_total(manifest)
    assert conv["exif_rotated"] == conv["16bit"] == conv["alpha"] == conv["first_frame"] == 1
    assert conv["palette"] == 2 and conv["grayscale"] == 2 and conv["not_jpeg"] == 6
    assert verify(out) == []


def converted_total(manifest: dict) -> dict[str, int]:
    total: dict[str, int] = {}
    for info in manifest["splits"].values():
        for k, v in info["converted"].items():
            total[k] = total.get(k, 0) + v
    return total


def test_a_zip_of_the_tree_packs_the_same_images(class_tree, class_pack, tmp_path):
    import zipfile

    zpath = tmp_path / "pets.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in sorted(class_tree.rglob("*")):
            if p.is_file():
                z.write(p, f"pets/{p.relative_to(class_tree).as_posix()}")  # one top folder, as `zip -r` makes
    m = pack(zpath, tmp_path / "out", PackOptions(shard_size=4, workers=1, image_size=32, val_fraction=0.2))
    first = class_pack[1]
    assert m["classes"] == first["classes"] and m["layout"] == first["layout"]
    assert {s: i["count"] for s, i in m["splits"].items()} == {s: i["count"] for s, i in first["splits"].items()}
    assert sorted(r["path"] for r in m["rejected"]) == sorted(r["path"] for r in first["rejected"])


def test_a_presplit_tree_keeps_its_val_and_trains_classes(tmp_path):
    root = tmp_path / "split"
    for split, classes in (("train", ("apple", "pear")), ("val", ("apple", "pear", "plum"))):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(3 if split == "train" else 1):
                photo(48, 40, i).save(root / split / c / f"{c}{i}.png")
    (root / "test").mkdir()
    photo(30, 30).save(root / "test" / "unknown.jpg")  # a test split of images alone: no labels
    m = pack(root, tmp_path / "out", PackOptions(shard_size=10, workers=1, image_size=16, splits=("train", "val", "test")))
    assert m["layout"] == {"name": "classes", "val": "val/", "presplit": True}
    assert m["classes"] == ["apple", "pear"]
    assert m["splits"]["train"]["count"] == 6 and m["splits"]["val"]["count"] == 2
    val = samples(tmp_path / "out", "val")
    assert {stem: label for stem, (_, label) in val.items()} == {"apple0": 0, "pear0": 1}
    assert {stem: label for stem, (_, label) in samples(tmp_path / "out", "test").items()} == {"unknown": -1}
    assert [r["reason"] for r in m["rejected"]] == ["class folder plum is not in train/"]
    with pytest.raises(DataError, match="--val-fraction does not apply: .* has its own val/ folder"):
        pack(root, tmp_path / "out2", PackOptions(image_size=16, val_fraction=0.1))


def test_a_flat_folder_has_no_classes_and_a_deterministic_val(tmp_path):
    root = tmp_path / "faces"
    root.mkdir()
    for i in range(20):
        photo(40 + i, 50, i).save(root / f"face_{i:02d}.jpg")
    runs = [pack(root, tmp_path / f"out{k}", PackOptions(shard_size=8, workers=2, image_size=32, seed=7))
            for k in range(2)]
    m = runs[0]
    assert m["layout"]["name"] == "flat" and m["classes"] == [] and m["rejected"] == []
    assert m["splits"]["val"]["count"] == 1 and m["splits"]["train"]["count"] == 19  # 0.05 x 20
    vals = [set(samples(tmp_path / f"out{k}", "val")) for k in range(2)]
    assert vals[0] == vals[1]  # the same files held out for the same tree and seed
    train = samples(tmp_path / "out0", "train")
    assert {label for _, label in train.values()} == {-1} and not set(train) & vals[0]
    quarter = pack(root, tmp_path / "q", PackOptions(workers=1, image_size=32, val_fraction=0.25))
    assert quarter["splits"]["val"]["count"] == 5
    none = pack(root, tmp_path / "z", PackOptions(workers=1, image_size=32, val_fraction=0))
    assert list(none["splits"]) == ["train"] and none["layout"]["val"] == "none"


def test_a_file_over_256_mib_is_refused_unread_in_a_folder_and_a_zip(tmp_path):
    """A file no image could be is named in `rejected` from its size alone: the folder's is
    sparse and the zip's member compresses to little, and neither is read into memory."""
    root = tmp_path / "big"
    root.mkdir()
    photo(40, 40).save(root / "small.jpg")
    over = (256 << 20) + 1
    with open(root / "huge.jpg", "wb") as f:
        f.truncate(over)
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.write(root / "small.jpg", "small.jpg")
        with z.open("huge.jpg", "w", force_zip64=True) as member:
            for _ in range(256):
                member.write(bytes(1 << 20))
            member.write(b"\0")
    for src in (root, archive):
        m = pack(src, tmp_path / f"out-{src.name}", PackOptions(workers=1, image_size=32, val_fraction=0))
        assert m["splits"]["train"]["count"] == 1
        assert m["rejected"] == [{"path": "huge.jpg",
                                  "reason": f"unreadable file ({over} bytes, more than an image may hold (256 MiB))"}]


@pytest.fixture(scope="module")
def shards_128(tmp_path_factory) -> Path:
    """40 photos of assorted sizes, no classes, packed at 128x128 with 8 held out."""
    root = tmp_path_factory.mktemp("own128") / "photos"
    root.mkdir()
    for i in range(40):
        photo(130 + 7 * i, 200 - i, i).save(root / f"p{i}.{('jpg', 'png', 'webp')[i % 3]}")
    out = tmp_path_factory.mktemp("shards128")
    r = run_cli("pack", str(root), str(out), "--image-size", "128", "--val-fraction", "0.2", "--shard-size", "16")
    assert r.returncode == 0, r.stderr
    assert "layout: flat (no classes; val: held out: 0.2" in r.stdout and "img/s" in r.stdout
    assert json.loads((out / "manifest.json").read_text())["image_size"] == 128
    return out


@needs_loader
@pytest.mark.parametrize("loader", with_loader("dali", "webdataset"))
def test_training_follows_the_shards_image_size(shards_128, tmp_path, loader):
    run = tmp_path / "run"
    r = run_cli("train", f"--data.shards={shards_128}", f"--data.loader={loader}", f"--train.out_dir={run}",
                "--train.max_steps=3", "--train.batch_size=8", "--train.eval_every=0", "--log.log_every=1",
                "--log.wandb_mode=disabled", *TINY_MODEL)
    assert r.returncode == 0, r.stderr
    assert "image_size: 128" in (run / "config.yaml").read_text()  # followed manifest.json
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "split" not in row] == [1, 2, 3]
    assert all(np.isfinite(row["loss"]) for row in rows)
    if loader == "webdataset":
        return
    pictures = run_cli("viz", str(run), str(tmp_path / "viz"))
    assert pictures.returncode == 0, pictures.stderr
    grid = Image.open(tmp_path / "viz" / "reconstructions.png")
    assert grid.size == (8 * (128 + 2) + 2, 2 * (128 + 2) + 2)  # 8 originals over their reconstructions
    assert (tmp_path / "viz" / "latent_space.png").is_file()
    scored = run_cli("eval", str(run), "--shards", str(shards_128), "--batch-size", "4")
    assert scored.returncode == 0, scored.stderr
    assert scored.stdout.startswith("val: 8 images | ELBO ")


def test_sizes_that_cannot_work_are_one_line_errors(shards_128, tmp_path):
    r = run_cli("pack", str(tmp_path), str(tmp_path / "o"), "--image-size", "100")
    assert r.returncode == 2 and r.stderr.strip() == (
        "vae-dist: error: --image-size must be a multiple of 16 from 16 to 512 (the VAE halves it 4 times), got 100")
    r = run_cli("train", f"--data.shards={shards_128}", f"--train.out_dir={tmp_path}/r", "--model.image_size=64",
                *TINY_MODEL)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"model.image_size=64 but the shards in {shards_128} hold 128x128 images: leave model.image_size " \
           "unset" in r.stderr
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def test_a_jpeg_decoded_at_reduced_scale_is_resized_and_counted():
    from vae_dist.data.images import to_shard_jpeg

    big = io.BytesIO()
    halves(512, 512, (255, 0, 0), (0, 0, 255)).save(big, format="JPEG", quality=95)
    jpeg, reason, changes = to_shard_jpeg(big.getvalue(), 128)  # libjpeg's 1/4 scale lands on 128 itself
    pixels = np.asarray(Image.open(io.BytesIO(jpeg))).astype(int)
    assert reason is None and changes == {"resized": 1} and pixels.shape == (128, 128, 3)
    assert pixels[:, :48, 0].mean() > 200 and pixels[:, -48:, 2].mean() > 200
