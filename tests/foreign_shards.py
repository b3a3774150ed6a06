"""WebDataset tars as another tool writes them, made in a test: img2dataset's shape (`00000.tar`
... holding `KEY.jpg`, `KEY.txt`, `KEY.json`, with `00000.parquet` and `00000_stats.json` beside),
images of mixed sizes, a png and a webp among them; for `vae-dist index` (tests/test_index.py)
and for the URL tests that serve such a folder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SPECIES = ("cat", "dog", "owl")  # the json "species" values: labels by name


def picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth picture with some noise (JPEG sizes like a photo's, not a flat colour's)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-2, 2, (3, 2))
    img = np.stack([base[c] + slope[c, 0] * x + slope[c, 1] * y for c in range(3)], axis=-1)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], **({"quality": 90} if fmt == "jpg" else {}))
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def make_img2dataset(folder: Path, tars: int = 3, per_tar: int = 12, seed: int = 0, sizes=(48, 160),
                     cls: bool = False, extras: bool = True) -> dict:
    """Writes the tars into `folder`; returns {key: {"label", "species", "fmt", "size": (w, h)}}
    of every sample with an image. `cls`: a `.cls` member too (the label as text). `extras`: the
    odd samples an indexer must skip: in tar 0 one with no image and one whose key holds a space;
    and sample 1 of tar 0 a png, sample 2 a webp."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for t in range(tars):
        with tarfile.open(folder / f"{t:05d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            for n in range(per_tar):
                key = f"{t:05d}{n:04d}"
                fmt = ("png" if n == 1 else "webp" if n == 2 else "jpg") if (extras and t == 0) else "jpg"
                w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
                label = int(rng.integers(0, 5))
                species = SPECIES[label % len(SPECIES)]
                _add(tar, f"{key}.{fmt}", encode(picture(rng, w, h), fmt))
                if cls:
                    _add(tar, f"{key}.cls", f"{label}\n".encode())
                _add(tar, f"{key}.txt", f"a picture of a {species}".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "caption": f"a picture of a {species}", "status":
                                                     "success", "width": w, "height": h, "label": label,
                                                     "species": species}).encode())
                truth[key] = {"label": label, "species": species, "fmt": fmt, "size": (w, h)}
            if extras and t == 0:
                _add(tar, f"{t:05d}9998.txt", b"a caption whose image failed to download")
                _add(tar, f"{t:05d}9998.json", json.dumps({"status": "failed_to_download"}).encode())
                _add(tar, "bad key.jpg", encode(picture(rng, 64, 64), "jpg"))
        (folder / f"{t:05d}.parquet").write_bytes(b"PAR1 not really a parquet file PAR1")
        (folder / f"{t:05d}_stats.json").write_text(json.dumps({"count": per_tar, "successes": per_tar}))
    return truth
