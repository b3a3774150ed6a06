"""Decoding one source image and turning it into the shards' RGB SxS JPEG."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from vae_dist.errors import first_line

# Larger images are refused from their header alone, before any pixel is decoded
# (a 64x64 dataset has no use for them, and a forged header could ask for gigabytes).
MAX_PIXELS = 1 << 26


def to_shard_jpeg(data: bytes, size: int, quality: int = 95, keep_source: bool = True):
    """Returns (jpeg_bytes, None, changes) or (None, reason, {}).

    changes names what was done: 'grayscale', 'cmyk', 'other_mode', 'resized', 'not_jpeg'.
    Source bytes are kept as they are when already an RGB SxS baseline JPEG.
    """
    if not data:
        return None, "empty file", {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > MAX_PIXELS:
            return None, f"image too large ({w}x{h} pixels, limit {MAX_PIXELS})", {}
        fmt, mode = im.format, im.mode
        progressive = bool(im.info.get("progressive") or im.info.get("progression"))
        im.load()  # a truncated file fails here
    except UnidentifiedImageError:
        return None, "not an image", {}
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image too large (decompression bomb)", {}
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return None, f"unreadable image ({first_line(e)})", {}

    if keep_source and fmt == "JPEG" and mode == "RGB" and (w, h) == (size, size) and not progressive:
        return data, None, {}
    changes = {}
    if fmt != "JPEG":
        changes["not_jpeg"] = 1
    if mode in ("L", "LA", "1", "I", "I;16", "F"):
        changes["grayscale"] = 1
    elif mode == "CMYK":
        changes["cmyk"] = 1
    elif mode != "RGB":
        changes["other_mode"] = 1
    im = im.convert("RGB")
    if (w, h) != (size, size):
        changes["resized"] = 1
        side = min(w, h)  # centre square crop first, so nothing is stretched
        left, top = (w - side) // 2, (h - side) // 2
        im = im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue(), None, changes
