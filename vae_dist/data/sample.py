"""`vae-dist sample-data`: a small offline dataset in the Tiny ImageNet layout.

One class per real photograph that scikit-image ships inside its wheel (no download);
every image is a random 64x64 crop of its class's photo (random scale, position and
flip), so a VAE trained on it has real image statistics to learn. The grayscale photos
stay grayscale JPEGs, as some of Tiny ImageNet's do. Deterministic for a seed, whatever the
number of workers: every crop's box and flip are drawn first, in one random stream, and only
the resizing and JPEG encoding (the cost: ~1 ms an image) is spread over processes.
"""

from __future__ import annotations

import multiprocessing
import random
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from vae_dist.data import available_cores
from vae_dist.files import output_dir

# (file in skimage/data, class name). All ship in the scikit-image wheel.
PHOTOS = [
    ("astronaut.png", "astronaut"),
    ("coffee.png", "coffee cup"),
    ("chelsea.png", "tabby cat"),
    ("rocket.jpg", "rocket"),
    ("hubble_deep_field.jpg", "galaxies"),
    ("retina.jpg", "retina"),
    ("ihc.png", "stained tissue"),
    ("motorcycle_left.png", "motorcycle"),
    ("camera.png", "cameraman"),
    ("coins.png", "coins"),
]


def _photo_dir() -> Path:
    import skimage.data  # the photos live beside this module

    return Path(skimage.data.__file__).parent


def _random_crop(size_wh: tuple[int, int], rng: random.Random, size: int) -> tuple[tuple[int, int, int, int], bool]:
    """A crop's box and flip, drawn from `rng` (the image work is `_render`'s)."""
    w, h = size_wh
    side = rng.randint(max(size, min(w, h) // 6), max(size, min(w, h) // 2))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    return (x, y, x + side, y + side), rng.random() < 0.5


_PHOTOS: list[Image.Image] = []  # the loaded photos, in the process that renders (forked workers inherit them)


def _render(jobs: list[tuple[int, tuple, bool, int, str]]) -> None:
    for photo, box, flip, size, path in jobs:
        crop = _PHOTOS[photo].resize((size, size), Image.Resampling.BICUBIC, box=box)
        (crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop).save(path, quality=90)


def _render_all(jobs: list, workers: int) -> None:
    chunks = [jobs[i:i + 2000] for i in range(0, len(jobs), 2000)]
    if workers <= 1 or len(chunks) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for chunk in chunks:
            _render(chunk)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_render, chunks))


def make_sample_dataset(
    out: str | Path,
    train_per_class: int = 200,
    val_per_class: int = 50,
    test_count: int = 50,
    seed: int = 0,
    image_size: int = 64,
    make_zip: bool = False,
    workers: int = 1,
) -> Path:
    """`workers`: rendering processes (0: the cores this process may use); the images are the same for any."""
    out = output_dir(out, "sample-data output folder")
    workers = workers or available_cores()
    rng = random.Random(seed)
    photos = []
    _PHOTOS.clear()
    for i, (fname, name) in enumerate(PHOTOS):
        im = Image.open(_photo_dir() / fname)
        _PHOTOS.append(im.convert("L" if im.mode in ("L", "I", "I;16", "1") else "RGB"))
        photos.append((f"n9{i:07d}", name, i))
    jobs = []

    def crop(photo: int, path: Path) -> None:
        box, flip = _random_crop(_PHOTOS[photo].size, rng, image_size)
        jobs.append((photo, box, flip, image_size, str(path)))

    (out / "val" / "images").mkdir(parents=True, exist_ok=True)
    (out / "test" / "images").mkdir(parents=True, exist_ok=True)
    (out / "wnids.txt").write_text("".join(f"{w}\n" for w, _, _ in photos))
    (out / "words.txt").write_text("".join(f"{w}\t{name}\n" for w, name, _ in photos))
    last = image_size - 1
    for wnid, _, im in photos:
        folder = out / "train" / wnid / "images"
        folder.mkdir(parents=True, exist_ok=True)
        boxes = []
        for j in range(train_per_class):
            crop(im, folder / f"{wnid}_{j}.JPEG")
            boxes.append(f"{wnid}_{j}.JPEG\t0\t0\t{last}\t{last}\n")
        (out / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    annotations = []
    val_items = [(wnid, im) for wnid, _, im in photos for _ in range(val_per_class)]
    rng.shuffle(val_items)
    for j, (wnid, im) in enumerate(val_items):
        crop(im, out / "val" / "images" / f"val_{j}.JPEG")
        annotations.append(f"val_{j}.JPEG\t{wnid}\t0\t0\t{last}\t{last}\n")
    (out / "val" / "val_annotations.txt").write_text("".join(annotations))
    for j in range(test_count):
        _, _, im = photos[rng.randrange(len(photos))]
        crop(im, out / "test" / "images" / f"test_{j}.JPEG")
    _render_all(jobs, workers)
    if make_zip:
        zip_path = out.with_suffix(".zip")
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as zf:
            for path in sorted(out.rglob("*")):
                if path.is_file():
                    zf.write(path, f"{out.name}/{path.relative_to(out).as_posix()}")
    return out
