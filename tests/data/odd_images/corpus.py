"""Writes a corpus of odd, broken and non-image files, and says what decode_image must make of each.

Generated at test time instead of committing binaries. Pillow is used here only (a test-only tool)
to write the formats OpenCV cannot encode: CMYK JPEG, EXIF orientation, palette, grayscale+alpha.

Run ``python tests/data/odd_images/corpus.py OUTDIR`` to write the corpus for a manual look.
"""

from __future__ import annotations

import io
import os
import sys
import zlib

import cv2
import numpy as np
from PIL import Image

Expected = tuple[int, int, int] | str
"""A decoded shape (H, W, 3), or the ImageDecodeError.reason the file must raise."""

LARGE_W, LARGE_H = 6000, 4000


def _pattern(h: int, w: int) -> np.ndarray:
    """RGB test card: smooth gradients plus a red block at the top-left corner (orientation marker)."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                    np.full((h, w), 96)], axis=-1).astype(np.uint8)
    img[: h // 4, : w // 4] = (255, 0, 0)
    return img


def _large_card() -> np.ndarray:
    """A LARGE_H x LARGE_W BGR gradient card, built by broadcasting (an mgrid would cost 400 MB)."""
    x = np.arange(LARGE_W, dtype=np.uint16)
    y = np.arange(LARGE_H, dtype=np.uint16)
    card = np.empty((LARGE_H, LARGE_W, 3), np.uint8)
    card[..., 0] = (x >> 4) & 255
    card[..., 1] = ((y >> 4) & 255)[:, None]
    card[..., 2] = ((x[None, :] + y[:, None]) >> 6) & 255
    return card


def _pil_bytes(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _cv2_bytes(ext: str, arr: np.ndarray, params: tuple[int, ...] = ()) -> bytes:
    ok, enc = cv2.imencode(ext, arr, list(params))
    assert ok, ext
    return enc.tobytes()


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + ctype + body + zlib.crc32(ctype + body).to_bytes(4, "big")


def _png_with_header(width: int, height: int) -> bytes:
    """A structurally complete PNG whose IHDR declares width x height (8-bit gray) over a tiny IDAT."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[274] = orientation
    return exif


def build_odd_corpus() -> dict[str, tuple[bytes, Expected]]:
    """name -> (file bytes, expected decode result). Deterministic."""
    h, w = 48, 64
    rgb = _pattern(h, w)
    bgr = rgb[:, :, ::-1]
    shape = (h, w, 3)
    rng = np.random.default_rng(1234)
    files: dict[str, tuple[bytes, Expected]] = {}

    # --- decodable odd formats
    files["rgb.jpg"] = (_cv2_bytes(".jpg", bgr, (cv2.IMWRITE_JPEG_QUALITY, 95)), shape)
    files["UPPER_CASE.JPEG"] = files["rgb.jpg"]
    files["gray.jpg"] = (_cv2_bytes(".jpg", rgb[:, :, 1]), shape)
    files["progressive.jpg"] = (_pil_bytes(Image.fromarray(rgb), "JPEG", progressive=True, quality=90), shape)
    files["restart_markers.jpg"] = (_cv2_bytes(".jpg", bgr, (cv2.IMWRITE_JPEG_RST_INTERVAL, 2)), shape)
    files["cmyk.jpg"] = (_pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), shape)
    files["exif_rot6.jpg"] = (_pil_bytes(Image.fromarray(rgb), "JPEG", exif=_exif(6), quality=95), (w, h, 3))
    files["exif_rot3.jpg"] = (_pil_bytes(Image.fromarray(rgb), "JPEG", exif=_exif(3), quality=95), shape)
    jpg = files["rgb.jpg"][0]
    files["trailer_after_eoi.jpg"] = (jpg + b"SEFHtrailer-data" + bytes(100), shape)
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))])
    files["rgba.png"] = (_pil_bytes(Image.fromarray(rgba), "PNG"), shape)
    files["gray_alpha.png"] = (_pil_bytes(Image.fromarray(rgba).convert("LA"), "PNG"), shape)
    files["palette.png"] = (_pil_bytes(Image.fromarray(rgb).convert("P"), "PNG"), shape)
    files["palette_trns.png"] = (_pil_bytes(Image.fromarray(rgb).convert("P"), "PNG", transparency=0), shape)
    files["bilevel.png"] = (_pil_bytes(Image.fromarray(rgb[:, :, 0] > 127), "PNG"), shape)
    files["gray.png"] = (_cv2_bytes(".png", rgb[:, :, 1]), shape)
    wide16 = rgb.astype(np.uint16) * 257
    files["rgb16.png"] = (_cv2_bytes(".png", wide16[:, :, ::-1]), shape)
    files["gray16.png"] = (_cv2_bytes(".png", wide16[:, :, 1]), shape)
    opaque16 = np.full((h, w), 65535, np.uint16)
    files["rgba16.png"] = (_cv2_bytes(".png", np.dstack([wide16[:, :, ::-1], opaque16])), shape)
    files["exif_rot6.png"] = (_pil_bytes(Image.fromarray(rgb), "PNG", exif=_exif(6)), (w, h, 3))
    files["rgb16.tif"] = (_cv2_bytes(".tif", wide16[:, :, ::-1]), shape)
    files["rgb.tiff"] = (_cv2_bytes(".tiff", bgr), shape)
    files["float32.tif"] = (_cv2_bytes(".tif", (bgr.astype(np.float32) / 255.0)), shape)
    files["exif_rot6.tif"] = (_pil_bytes(Image.fromarray(rgb), "TIFF", exif=_exif(6)), (w, h, 3))
    files["lossy.webp"] = (_cv2_bytes(".webp", bgr, (cv2.IMWRITE_WEBP_QUALITY, 90)), shape)
    files["lossless_rgba.webp"] = (_pil_bytes(Image.fromarray(rgba), "WEBP", lossless=True), shape)
    files["exif_rot6.webp"] = (_pil_bytes(Image.fromarray(rgb), "WEBP", exif=_exif(6), quality=90), (w, h, 3))
    files["rgb.bmp"] = (_cv2_bytes(".bmp", bgr), shape)
    files["gray.bmp"] = (_cv2_bytes(".bmp", rgb[:, :, 1]), shape)
    files["two_by_two.png"] = (_cv2_bytes(".png", bgr[:2, :2]), (2, 2, 3))
    files["large_6000x4000.jpg"] = (_cv2_bytes(".jpg", _large_card(), (cv2.IMWRITE_JPEG_QUALITY, 80)),
                                    (LARGE_H, LARGE_W, 3))

    # --- rejected: size limits
    files["tiny_1x1.png"] = (_cv2_bytes(".png", bgr[:1, :1]), "too_small")
    files["one_row_5x1.jpg"] = (_cv2_bytes(".jpg", bgr[:1, :5]), "too_small")
    files["zero_width.png"] = (_png_with_header(0, 16), "too_small")
    files["bomb_40000x40000.png"] = (_png_with_header(40000, 40000), "too_large")

    # --- rejected: broken or not images
    files["empty.jpg"] = (b"", "empty")
    files["truncated.jpg"] = (jpg[: len(jpg) * 2 // 3], "truncated")
    files["header_only.jpg"] = (jpg[:200], "truncated")
    png = files["rgb16.png"][0]
    files["truncated.png"] = (png[: len(png) // 2], "truncated")
    files["signature_only.png"] = (png[:5], "truncated")
    webp = files["lossy.webp"][0]
    files["truncated.webp"] = (webp[: len(webp) // 2], "truncated")
    bmp = files["rgb.bmp"][0]
    files["truncated.bmp"] = (bmp[: len(bmp) // 2], "truncated")
    tif = files["rgb.tiff"][0]
    files["truncated.tiff"] = (tif[: len(tif) // 2], "truncated")
    pil_tif = _pil_bytes(Image.fromarray(rgb), "TIFF")  # Pillow puts the IFD first, strips after
    files["truncated_strips.tif"] = (pil_tif[: len(pil_tif) // 2], "truncated")
    files["text_as.jpg"] = (b"This is a text file that was renamed to .jpg\n" * 20, "not_an_image")
    files["random_bytes.png"] = (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not_an_image")
    files["notes.txt"] = (b"shopping list:\n- eggs\n- milk\n", "not_an_image")
    files[".DS_Store"] = (b"\x00\x00\x00\x01Bud1" + bytes(2048), "not_an_image")
    files["Thumbs.db"] = (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(512), "not_an_image")
    files["animation.gif"] = (_pil_bytes(Image.fromarray(rgb).convert("P"), "GIF"), "unsupported_format")
    return files


def write_odd_corpus(dirpath: str) -> dict[str, Expected]:
    """Write every corpus file into ``dirpath`` (created if needed); return name -> expected result."""
    os.makedirs(dirpath, exist_ok=True)
    expected: dict[str, Expected] = {}
    for name, (data, exp) in build_odd_corpus().items():
        with open(os.path.join(dirpath, name), "wb") as fh:
            fh.write(data)
        expected[name] = exp
    return expected


if __name__ == "__main__":
    for item, result in sorted(write_odd_corpus(sys.argv[1]).items()):
        print(f"{item:28s} {result}")
