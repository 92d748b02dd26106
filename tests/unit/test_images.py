"""decode_image / probe_size over the odd-format corpus, plus pixel-exact checks of each conversion rule."""

from __future__ import annotations

import importlib.util
import io
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from u2seg.io.images import (
    IMAGE_EXTENSIONS,
    REASONS,
    ImageDecodeError,
    decode_image,
    has_image_extension,
    image_id_for,
    probe_size,
)

pytestmark = pytest.mark.unit

_CORPUS_PATH = Path(__file__).resolve().parents[1] / "data" / "odd_images" / "corpus.py"
_spec = importlib.util.spec_from_file_location("odd_images_corpus", _CORPUS_PATH)
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

CORPUS = corpus.build_odd_corpus()


def _decode_or_reason(data: bytes, **kwargs: object) -> tuple[int, ...] | str:
    try:
        out = decode_image(data, **kwargs)
    except ImageDecodeError as exc:
        assert exc.reason in REASONS
        return exc.reason
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.flags["C_CONTIGUOUS"]
    return out.shape


def _png(img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def _encode(fmt: str, img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[274] = orientation
    return exif


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_file_decodes_as_expected(name: str) -> None:
    data, expected = CORPUS[name]
    assert _decode_or_reason(data) == expected


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_probe_size_agrees_with_decode(name: str) -> None:
    data, expected = CORPUS[name]
    if isinstance(expected, str):
        with pytest.raises(ImageDecodeError) as err:
            probe_size(data)
        assert err.value.reason == expected
    else:
        assert probe_size(data) == (expected[1], expected[0])


def test_write_odd_corpus_writes_every_file(tmp_path: Path) -> None:
    expected = corpus.write_odd_corpus(str(tmp_path))
    assert set(expected) == set(CORPUS)
    for name, exp in expected.items():
        assert (tmp_path / name).read_bytes() == CORPUS[name][0]
        assert exp == CORPUS[name][1]


def test_image_extensions_filter_is_case_insensitive() -> None:
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
    assert has_image_extension("a/b/UPPER_CASE.JPEG") and has_image_extension("x.TiF")
    for junk in ("notes.txt", ".DS_Store", "Thumbs.db", "animation.gif", "jpg", "archive.jpg.zip"):
        assert not has_image_extension(junk)


def test_image_id_is_stable_sha1_prefix() -> None:
    assert image_id_for("s3://bucket/images/000001.jpg") == "1c37532bc02b44af"
    assert image_id_for("/data/ü.png") == "7cc52849b5bc9fc8"
    assert image_id_for("/a.jpg") != image_id_for("/b.jpg")


def test_error_is_a_value_error_with_reason() -> None:
    with pytest.raises(ValueError) as err:
        decode_image(b"")
    assert isinstance(err.value, ImageDecodeError) and err.value.reason == "empty"


def test_accepts_bytearray_and_memoryview() -> None:
    data = CORPUS["rgb.jpg"][0]
    ref = decode_image(data)
    assert np.array_equal(decode_image(bytearray(data)), ref)
    assert np.array_equal(decode_image(memoryview(data)), ref)


def test_max_pixels_checked_from_header() -> None:
    data = CORPUS["large_6000x4000.jpg"][0]
    for call in (decode_image, probe_size):
        with pytest.raises(ImageDecodeError) as err:
            call(data, max_pixels=6000 * 4000 - 1)
        assert err.value.reason == "too_large"
    assert probe_size(data, max_pixels=6000 * 4000) == (6000, 4000)


@pytest.mark.parametrize(
    "name", ["rgb.jpg", "progressive.jpg", "restart_markers.jpg", "rgb16.png", "lossy.webp", "rgb.bmp"])
def test_every_prefix_is_rejected_as_truncated(name: str) -> None:
    """cv2 alone returns a half-grey picture for a cut JPEG; every cut must be a 'truncated' error."""
    data = CORPUS[name][0]
    cuts = sorted(set(range(1, 64)) | set(range(64, len(data), max(1, len(data) // 97))) | {len(data) - 1})
    for cut in cuts:
        with pytest.raises(ImageDecodeError) as err:
            decode_image(data[:cut])
        assert err.value.reason == "truncated", (cut, str(err.value))


def test_16bit_is_scaled_with_rounding_not_clipped() -> None:
    values = np.array([[0, 128, 129, 257, 32767, 32768, 51400, 65535]], dtype=np.uint16)
    expected = np.floor(values / 257 + 0.5).astype(np.uint8)
    gray = np.repeat(values, 2, axis=0)
    for ext, arr in ((".png", gray), (".tif", np.dstack([gray] * 3))):
        data = cv2.imencode(ext, arr)[1].tobytes()
        out = decode_image(data)
        assert np.array_equal(out[0, :, 0], expected[0])
        assert np.array_equal(out[..., 0], out[..., 2])
    assert list(expected[0]) == [0, 0, 1, 1, 127, 128, 200, 255]


def test_16bit_color_png_matches_8bit_source() -> None:
    src = corpus._pattern(48, 64)
    assert np.array_equal(decode_image(CORPUS["rgb16.png"][0]), src)
    assert np.array_equal(decode_image(CORPUS["rgb16.tif"][0]), src)
    assert np.array_equal(decode_image(CORPUS["float32.tif"][0]), src)


def test_alpha_is_composited_over_black() -> None:
    color = np.zeros((4, 5, 4), np.uint8)
    color[..., :3] = (200, 100, 50)
    color[..., 3] = np.array([0, 64, 128, 255, 255], np.uint8)
    color[:, 4, :3] = (10, 20, 30)
    out = decode_image(_png(Image.fromarray(color)))
    assert np.array_equal(out[0, 0], [0, 0, 0])
    assert np.array_equal(out[0, 3], [200, 100, 50])
    assert np.array_equal(out[0, 4], [10, 20, 30])
    assert np.array_equal(out[0, 2], np.floor(np.array([200, 100, 50]) * 128 / 255 + 0.5))
    la = decode_image(CORPUS["gray_alpha.png"][0])
    assert np.array_equal(la[:, 0], np.zeros((48, 3), np.uint8))  # alpha column 0 is 0
    assert np.array_equal(la[..., 0], la[..., 1])
    webp = decode_image(CORPUS["lossless_rgba.webp"][0])
    assert np.array_equal(webp, decode_image(CORPUS["rgba.png"][0]))


def test_palette_and_gray_are_expanded_exactly() -> None:
    pal = CORPUS["palette.png"][0]
    ref = np.asarray(Image.open(io.BytesIO(pal)).convert("RGB"))
    assert np.array_equal(decode_image(pal), ref)
    gray = decode_image(CORPUS["gray.png"][0])
    assert np.array_equal(gray[..., 0], corpus._pattern(48, 64)[..., 1])
    assert np.array_equal(gray[..., 0], gray[..., 2])
    bilevel = decode_image(CORPUS["bilevel.png"][0])
    assert set(np.unique(bilevel)) == {0, 255}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_matches_pillow(orientation: int) -> None:
    rng = np.random.default_rng(orientation)
    src = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    data = _png(src, exif=_exif(orientation))
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    out = decode_image(data)
    assert np.array_equal(out, ref)
    assert probe_size(data) == (out.shape[1], out.shape[0])


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_other_containers(fmt: str, orientation: int) -> None:
    src = corpus._pattern(48, 64)
    plain = decode_image(_encode(fmt, Image.fromarray(src), quality=95))
    rotated = decode_image(_encode(fmt, Image.fromarray(src), quality=95, exif=_exif(orientation)))
    turned = {3: np.rot90(plain, 2), 6: np.rot90(plain, -1), 8: np.rot90(plain, 1)}[orientation]
    assert np.array_equal(rotated, turned)
    red = (rotated[..., 0] > 200) & (rotated[..., 1] < 60)  # the red block marks the stored top-left
    corner = {3: (slice(-12, None), slice(-16, None)), 6: (slice(0, 16), slice(-12, None)),
              8: (slice(-16, None), slice(0, 12))}[orientation]
    assert red[corner].mean() > 0.9


def test_exif_rot6_jpeg_written_by_corpus() -> None:
    out = decode_image(CORPUS["exif_rot6.jpg"][0])
    assert out.shape == (64, 48, 3)
    assert out[:8, -6:, 0].mean() > 200 and out[:8, :6, 0].mean() < 100  # stored top-left is now top-right


def test_cmyk_jpeg_colors() -> None:
    src = corpus._pattern(48, 64)
    out = decode_image(CORPUS["cmyk.jpg"][0])
    assert np.abs(out.astype(int) - src).mean() < 6


def test_trailing_data_after_eoi_is_accepted() -> None:
    plain = decode_image(CORPUS["rgb.jpg"][0])
    assert np.array_equal(decode_image(CORPUS["trailer_after_eoi.jpg"][0]), plain)


@pytest.mark.parametrize("name", sorted(n for n, (_, exp) in CORPUS.items() if isinstance(exp, tuple)))
def test_probe_size_of_a_prefix(name: str) -> None:
    """A ranged read of the head gives the size, or 'truncated' meaning: read the whole file."""
    data, expected = CORPUS[name]
    for cut in (64, 1024, 65536):
        try:
            size = probe_size(data[:cut], prefix=True)
        except ImageDecodeError as exc:
            assert exc.reason == "truncated"
            assert cut < len(data)
        else:
            assert size == (expected[1], expected[0])


def test_prefix_probe_reads_only_the_header_of_a_large_jpeg() -> None:
    data = CORPUS["large_6000x4000.jpg"][0]
    assert len(data) > 65536
    assert probe_size(data[:65536], prefix=True) == (6000, 4000)
    assert probe_size(CORPUS["exif_rot6.jpg"][0][:1024], prefix=True) == (48, 64)
    assert probe_size(CORPUS["truncated.jpg"][0], prefix=True) == (64, 48)
    with pytest.raises(ImageDecodeError) as err:
        probe_size(data[:65536])
    assert err.value.reason == "truncated"
    for name in ("tiny_1x1.png", "bomb_40000x40000.png", "text_as.jpg", "empty.jpg"):
        with pytest.raises(ImageDecodeError) as err:
            probe_size(CORPUS[name][0], prefix=True)
        assert err.value.reason == CORPUS[name][1]


def _bmp_bitfields_bgrx(pixel: bytes, w: int = 8, h: int = 4) -> bytes:
    """A 32-bit BI_BITFIELDS BMP (masks R=0xFF0000, G=0xFF00, B=0xFF, no alpha) of one repeated pixel."""
    body = pixel * (w * h)
    dib = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 32, 3, len(body), 2835, 2835, 0, 0)
    masks = struct.pack("<III", 0xFF0000, 0xFF00, 0xFF)
    offset = 14 + len(dib) + len(masks)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + dib + masks + body


def test_bmp_bitfields_pad_byte_is_not_alpha() -> None:
    """OpenCV reads the zero pad byte of BGRX bitfields as alpha (a black picture); the masks say RGB."""
    out = decode_image(_bmp_bitfields_bgrx(bytes([10, 20, 30, 0])))
    assert out.shape == (4, 8, 3)
    assert np.array_equal(out.reshape(-1, 3), np.tile([30, 20, 10], (32, 1)))


def _jpeg_with_sof_size(width: int, height: int) -> bytes:
    data = bytearray(CORPUS["rgb.jpg"][0])
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


@pytest.mark.parametrize(("width", "height"), [(64, 0), (0, 48), (1, 48)])
def test_zero_or_one_sided_headers_are_too_small(width: int, height: int) -> None:
    """Pillow refuses a zero-sized canvas ("not identified"); that must stay 'too_small', not 'corrupt'."""
    bmp = bytearray(CORPUS["rgb.bmp"][0])
    struct.pack_into("<ii", bmp, 18, width, height)
    for data in (_jpeg_with_sof_size(width, height), bytes(bmp)):
        for call in (decode_image, probe_size):
            with pytest.raises(ImageDecodeError) as err:
                call(data)
            assert err.value.reason == "too_small", str(err.value)


def test_max_pixels_decides_not_pillows_global_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's MAX_IMAGE_PIXELS (bomb error/warning) is neither consulted nor changed: max_pixels decides."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    large = CORPUS["large_6000x4000.jpg"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail here
        assert probe_size(large) == (6000, 4000)
        assert decode_image(CORPUS["rgb.bmp"][0]).shape == (48, 64, 3)
        assert decode_image(_bmp_bitfields_bgrx(bytes([1, 2, 3, 0]), 64, 48)).shape == (48, 64, 3)
        assert probe_size(CORPUS["rgb16.tif"][0]) == (64, 48)
    assert Image.MAX_IMAGE_PIXELS == 1000
    huge = _jpeg_with_sof_size(30000, 20000)  # 600 Mpx declared, a few KB of data
    for call in (decode_image, probe_size):
        with pytest.raises(ImageDecodeError) as err:
            call(huge)
        assert err.value.reason == "too_large"
    assert probe_size(huge, max_pixels=30000 * 20000) == (30000, 20000)


def test_bigtiff_size_comes_from_the_header() -> None:
    src = corpus._pattern(48, 64)
    data = _encode("TIFF", Image.fromarray(src), big_tiff=True)
    assert data[:4] == b"II+\x00"
    assert probe_size(data) == (64, 48)
    assert np.array_equal(decode_image(data), src)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, max_pixels=64 * 48 - 1)
    assert err.value.reason == "too_large"


def test_malformed_exif_is_ignored() -> None:
    """An Exif block that is not TIFF-structured leaves the picture as stored (orientation 1)."""
    plain = CORPUS["rgb.jpg"][0]
    junk = b"Exif\x00\x00" + b"XX*\x00garbage" * 4
    data = plain[:2] + b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk + plain[2:]
    assert np.array_equal(decode_image(data), decode_image(plain))
    assert probe_size(data) == (64, 48)


def test_jpeg_prefix_cut_inside_the_header_asks_for_more() -> None:
    """A prefix that ends before or inside the frame header is 'truncated' (read the whole file)."""
    data = CORPUS["rgb.jpg"][0]
    sof, sos = data.find(b"\xff\xc0"), data.find(b"\xff\xda")
    for cut in (sof, sof + 4, sof + 10):
        with pytest.raises(ImageDecodeError) as err:
            probe_size(data[:cut], prefix=True)
        assert err.value.reason == "truncated", cut
    assert probe_size(data[: sos + 14], prefix=True) == (64, 48)
