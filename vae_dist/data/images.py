"""Decoding one source image and turning it into the shards' RGB SxS JPEG."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from vae_dist.errors import first_line

# Larger images are refused from their header alone, before any pixel is decoded (a forged
# header could ask for gigabytes); 64 M pixels passes every camera but medium format.
MAX_PIXELS = 1 << 26
# Memory. A JPEG decodes reduced (libjpeg's 1/2..1/8 scales, never below S); other formats
# decode whole, at most MAX_PIXELS x 4 bytes (RGBA, I, F: 256 MiB). An image decoded larger
# than STRIP_PIXELS is then made RGB and shrunk strip by strip, so no full-size copy is ever
# made beside it (an 8192x8192 RGBA PNG took 835 MB above the worker's own as a whole, 290 MB
# in strips); smaller ones are converted whole (at most ~50 MB).
STRIP_PIXELS = 1 << 22
_GRAY = ("L", "LA", "La", "1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
# EXIF Orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
_T = Image.Transpose
_UPRIGHT = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE, 6: _T.ROTATE_270,
            7: _T.TRANSVERSE, 8: _T.ROTATE_90}


def to_shard_jpeg(data: bytes, size: int, quality: int = 95, keep_source: bool = True):
    """Returns (jpeg_bytes, None, changes) or (None, reason, {}): the image as an RGB SxS JPEG, its
    shorter side resized to S around the centre (nothing is stretched), upright by its EXIF tag.

    changes names what was done: 'grayscale', 'cmyk', 'palette', 'alpha' (composited on white),
    '16bit' (scaled to 8 bits), 'other_mode', 'exif_rotated', 'first_frame' (of an animation),
    'resized', 'not_jpeg'. Source bytes are kept as they are when already an upright RGB SxS
    baseline JPEG.
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
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        orientation = orientation if orientation in _UPRIGHT else 1  # a tag out of range: as stored
        frames = getattr(im, "n_frames", 1)
        if fmt == "JPEG":
            im.draft(None, (size, size))  # libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below S
        im.load()  # a truncated file fails here
    except UnidentifiedImageError:
        return None, "not an image", {}
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image too large (decompression bomb)", {}
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        return None, f"unreadable image ({first_line(e)})", {}

    if keep_source and fmt == "JPEG" and mode == "RGB" and (w, h) == (size, size) and not progressive \
            and orientation == 1:
        return data, None, {}
    changes = {}
    if fmt != "JPEG":
        changes["not_jpeg"] = 1
    if frames > 1:
        changes["first_frame"] = 1
    if im.width * im.height > STRIP_PIXELS:
        im, what = _rgb_centre_shrunk(im, size)
    else:
        im, what = _to_rgb(im)
    changes.update(dict.fromkeys(what, 1))
    if orientation != 1:
        im = im.transpose(_UPRIGHT[orientation])
        changes["exif_rotated"] = 1
    if (w, h) != (size, size):  # as stored (libjpeg's draft may already have scaled it to S)
        changes["resized"] = 1
    if im.size != (size, size):
        w, h = im.size
        side = min(w, h)  # the centre square, resized: the shorter side becomes S
        left, top = (w - side) // 2, (h - side) // 2
        im = im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue(), None, changes


def _rgb_centre_shrunk(im: Image.Image, size: int) -> tuple[Image.Image, list[str]]:
    """(the centre square of a large image in RGB, shrunk by a whole factor to no less than 2S
    a side, what the conversion did), made a strip of rows at a time: each strip is cropped,
    made RGB as _to_rgb does (on the whole image's range, so the strips agree) and averaged
    down, so memory holds the decoded image and one strip, never a full-size copy. The final
    resize to S is the caller's (Pillow's resize(reducing_gap=2) shrinks by a box first too)."""
    w, h = im.size
    factor = max(1, min(w, h) // (2 * size))
    side = min(w, h) // factor * factor
    left, top = (w - side) // 2, (h - side) // 2
    rows = factor * max(1, STRIP_PIXELS // 8 // (side * factor))  # a strip: ~0.5 M pixels, whole factors
    extrema = im.getextrema() if im.mode in ("I", "F") or im.mode.startswith("I;16") else None
    out, what = Image.new("RGB", (side // factor, side // factor)), []
    for y in range(0, side, rows):
        strip = im.crop((left, top + y, left + side, top + min(y + rows, side)))
        strip, what = _to_rgb(strip, extrema)
        out.paste(strip.reduce(factor) if factor > 1 else strip, (0, y // factor))
    return out, what


def _to_rgb(im: Image.Image, extrema: tuple | None = None) -> tuple[Image.Image, list[str]]:
    """(the image in RGB, what the conversion did). Pillow's own conversion clips 16-bit values
    at 255 (a 16-bit PNG would come out white) and drops alpha (transparent pixels keep whatever
    colour they hold), so both are done here. `extrema`: the (min, max) of the whole image, where
    `im` is a part of it."""
    mode, what = im.mode, []
    if mode == "RGB":
        return im, what
    if mode == "CMYK":
        return im.convert("RGB"), ["cmyk"]
    if mode == "P":
        what.append("palette")
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if mode in _GRAY:
        what.append("grayscale")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        pixels = np.asarray(im, dtype=np.float64)
        top = pixels.max(initial=0) if extrema is None else extrema[1]
        if im.mode.startswith("I;16") or top > 255:  # 16-bit data: 65535 is white
            pixels = pixels / 257
            what.append("16bit")
        elif im.mode == "F" and top <= 1:  # float data in [0, 1]
            pixels = pixels * 255
        im = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    if im.mode in _ALPHA:
        rgba = im.convert("RGBA")
        what.append("alpha")
        im = Image.new("RGB", rgba.size, (255, 255, 255))
        im.paste(rgba, mask=rgba.getchannel("A"))
        return im, what
    if im.mode != "RGB":
        if not what:
            what.append("other_mode")
        im = im.convert("RGB")
    return im, what
