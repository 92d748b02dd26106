"""Image bytes -> uint8 RGB arrays, with one typed error for everything that is not a usable image.

Why this exists: the pipeline reads images from arbitrary folders and buckets. OpenCV alone is
too forgiving (a truncated JPEG decodes to a half-grey picture without an error) and too unsafe (a
small file can declare a gigapixel canvas). So every input first goes through a cheap header walk
(format sniffing, dimensions, EXIF orientation, truncation) and only then through ``cv2.imdecode``.

Conversion rules (documented contract of :func:`decode_image`):

* Output is always ``uint8`` ``H x W x 3`` RGB, C-contiguous.
* EXIF orientation is applied (JPEG APP1, PNG eXIf, WebP EXIF; TIFF orientation is applied by
  libtiff inside OpenCV), so the array is the picture as a viewer shows it.
* Grayscale is replicated to 3 channels; palette and 1-bit images are expanded by the decoder.
* Alpha (RGBA, grayscale+alpha, palette with tRNS) is composited over black: fully transparent
  pixels become black whatever colour they stored, which keeps hidden garbage out of the features.
* 16-bit samples are rounded to the nearest 8-bit value (``v / 257``), never clipped; float TIFF
  samples are read as [0, 1] and clipped to it.
* CMYK / YCCK JPEGs are converted to RGB by the decoder (Adobe inverted CMYK included).
* Accepted containers: JPEG, PNG, BMP, TIFF, WebP (the suffixes in :data:`IMAGE_EXTENSIONS`).
  Format is sniffed from the bytes, never from the file name.
* Rejected: fewer than 2 pixels on a side ("too_small"), more than ``max_pixels`` ("too_large",
  checked from the header before any pixel is decoded), files without their end marker
  ("truncated": JPEG EOI, PNG IEND, RIFF size, BMP pixel array, TIFF strips).

Decoding uses ``IMREAD_UNCHANGED`` because ``IMREAD_COLOR`` drops alpha and 16-bit depth; that
flag skips EXIF orientation, so orientation comes from our own header walk, which is also what
:func:`probe_size` reports: probe and decode always agree on (width, height).
"""

from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""Suffixes the manifest accepts (compare case-insensitively, see :func:`has_image_extension`)."""

DEFAULT_MAX_PIXELS = 178_956_970
"""Decompression-bomb bound (same value as Pillow's): about 13k x 13k pixels."""

MIN_SIDE = 2

# Reasons carried by ImageDecodeError.reason; stable strings, used in errors tables.
EMPTY = "empty"
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_FORMAT = "unsupported_format"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
TOO_LARGE = "too_large"
TOO_SMALL = "too_small"
REASONS = (EMPTY, NOT_AN_IMAGE, UNSUPPORTED_FORMAT, TRUNCATED, CORRUPT, TOO_LARGE, TOO_SMALL)


class ImageDecodeError(ValueError):
    """Raised for any input that cannot become an RGB image; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def image_id_for(uri: str) -> str:
    """Stable id of an image: reruns and retries of the same URI overwrite instead of duplicating."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:16]


def has_image_extension(name: str) -> bool:
    """True when ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class _Header:
    """What the header walk learned. ``width``/``height`` are as stored (before orientation)."""

    fmt: str
    width: int | None
    height: int | None
    orientation: int = 1  # EXIF value 1..8; 1 when absent or not applied by us

    def oriented_size(self) -> tuple[int, int] | None:
        """(width, height) as displayed, or None when the header did not give dimensions."""
        if self.width is None or self.height is None:
            return None
        if self.orientation in (5, 6, 7, 8):  # a quarter turn swaps the sides
            return self.height, self.width
        return self.width, self.height


# Formats whose EXIF orientation we apply ourselves (cv2 IMREAD_UNCHANGED ignores it for these).
# TIFF is oriented by libtiff inside OpenCV whatever the flags, so we only account for it in sizes.
_SELF_ORIENTED = ("jpeg", "png", "webp")


# ----------------------------------------------------------------------------- header parsing

_BMP_DIB_SIZES = (12, 40, 52, 56, 64, 108, 124)
_JP2_MAGIC = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


# Magic patterns; None is a wildcard byte. A short file that is a prefix of one is "truncated".
_MAGICS: tuple[tuple[str, tuple[int | None, ...]], ...] = (
    ("jpeg", tuple(b"\xff\xd8\xff")),
    ("png", tuple(b"\x89PNG\r\n\x1a\n")),
    ("webp", (*b"RIFF", None, None, None, None, *b"WEBP")),
    ("tiff", tuple(b"II*\x00")),
    ("tiff", tuple(b"MM\x00*")),
    ("bigtiff", tuple(b"II+\x00")),
    ("bigtiff", tuple(b"MM\x00+")),
    ("bmp", (*b"BM", *([None] * 16))),  # 18 bytes: the DIB header size is checked below
)


def _match(head: bytes, pattern: tuple[int | None, ...]) -> str | None:
    """'full' when head starts with pattern, 'prefix' when head is a cut-off start of it, else None."""
    for got, want in zip(head, pattern, strict=False):
        if want is not None and got != want:
            return None
    return "full" if len(head) >= len(pattern) else "prefix"


def _sniff(data: bytes) -> str:
    """Container format from magic bytes; raises for non-images and images we do not accept."""
    for fmt, pattern in _MAGICS:
        found = _match(data, pattern)
        if found == "prefix":
            raise ImageDecodeError(TRUNCATED, f"only {len(data)} bytes of a {fmt} signature")
        if found == "full":
            if fmt == "bmp" and struct.unpack_from("<I", data, 14)[0] not in _BMP_DIB_SIZES:
                continue  # "BM" alone is too weak: plain text may start with it
            return fmt
    if data[:6] in (b"GIF87a", b"GIF89a") or data[4:8] == b"ftyp" or data[:12] == _JP2_MAGIC:
        raise ImageDecodeError(UNSUPPORTED_FORMAT, f"image container not accepted (magic {data[:12]!r})")
    raise ImageDecodeError(NOT_AN_IMAGE, f"unknown magic bytes {data[:8]!r}")


def _exif_orientation(tiff: bytes) -> int:
    """Orientation tag (274) of IFD0 in a TIFF-structured EXIF block; 1 when absent or malformed."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    end = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(end + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack_from(end + "H", tiff, ifd)
    for i in range(count):
        off = ifd + 2 + 12 * i
        if off + 12 > len(tiff):
            break
        tag, typ = struct.unpack_from(end + "HH", tiff, off)
        if tag == 274 and typ == 3:
            (value,) = struct.unpack_from(end + "H", tiff, off + 8)
            return value if 1 <= value <= 8 else 1
    return 1



def _jpeg_marker_positions(data: bytes) -> np.ndarray:
    """Offsets of every 0xFF that starts a real marker: not a stuffed zero, restart marker or fill byte.

    Entropy-coded scan data contains no other 0xFF pairs, so the first such offset after a scan
    header is where the scan ends. One vectorised pass (about 10 ms for 14 MB) instead of a byte loop.
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    ff = np.flatnonzero(arr[:-1] == 0xFF)
    nxt = arr[ff + 1]
    return ff[(nxt != 0x00) & (nxt != 0xFF) & ((nxt < 0xD0) | (nxt > 0xD7))]

_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _jpeg_header(data: bytes, prefix: bool) -> _Header:
    """Walk JPEG segments to EOI: dimensions from SOF, orientation from Exif, truncation if no EOI.

    Walking the structure (instead of testing that the file ends with FFD9) accepts valid files with
    trailing data after EOI (phone cameras append such trailers) and still rejects cut-off files.
    With ``prefix`` the walk stops at the frame header (Exif APP1 must come before it).
    """
    n = len(data)
    pos = 2
    width = height = None
    orientation = 1
    markers: np.ndarray | None = None  # computed at the first scan
    while True:
        ff = data.find(b"\xff", pos)  # libjpeg also skips stray bytes between segments
        if ff < 0:
            raise ImageDecodeError(TRUNCATED, "JPEG ends before its EOI marker")
        pos = ff
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise ImageDecodeError(TRUNCATED, "JPEG ends inside a marker")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            break
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0x00):
            continue
        if pos + 2 > n:
            raise ImageDecodeError(TRUNCATED, "JPEG ends inside a segment length")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise ImageDecodeError(CORRUPT, f"JPEG segment {marker:#x} with length {length}")
        seg_end = pos + length
        if seg_end > n:
            raise ImageDecodeError(TRUNCATED, f"JPEG ends inside segment {marker:#x}")
        body = data[pos + 2 : seg_end]
        if marker in _JPEG_SOF and width is None:
            if len(body) < 5:
                raise ImageDecodeError(CORRUPT, "JPEG SOF segment too short")
            height, width = struct.unpack_from(">HH", body, 1)
            if prefix:
                break
        elif marker == 0xE1 and body[:6] == b"Exif\x00\x00" and orientation == 1:
            orientation = _exif_orientation(body[6:])
        pos = seg_end
        if marker == 0xDA:
            if markers is None:
                markers = _jpeg_marker_positions(data)
            at = int(np.searchsorted(markers, pos))
            if at == len(markers):
                raise ImageDecodeError(TRUNCATED, "JPEG scan data has no EOI marker (file cut off)")
            pos = int(markers[at])  # the 0xFF of the marker that ends the scan
    if width is None or height is None:
        raise ImageDecodeError(CORRUPT, "JPEG has no frame header (SOF)")
    return _Header("jpeg", width, height, orientation)


def _png_header(data: bytes, prefix: bool) -> _Header:
    """Walk PNG chunks to IEND: IHDR dimensions, eXIf orientation, truncation if IEND is missing.

    With ``prefix`` the walk stops at the first IDAT (eXIf belongs before the image data).
    """
    n = len(data)
    pos = 8
    width = height = None
    orientation = 1
    while True:
        if pos + 8 > n:
            raise ImageDecodeError(TRUNCATED, "PNG ends before its IEND chunk")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        if prefix and ctype == b"IDAT" and width is not None:
            break
        if pos + 12 + length > n:
            raise ImageDecodeError(TRUNCATED, f"PNG ends inside chunk {ctype!r}")
        body = data[pos + 8 : pos + 8 + length]
        if width is None:
            if ctype != b"IHDR" or length < 13:
                raise ImageDecodeError(CORRUPT, "PNG does not start with an IHDR chunk")
            width, height = struct.unpack_from(">II", body, 0)
        elif ctype == b"eXIf":
            orientation = _exif_orientation(body)
        elif ctype == b"IEND":
            break
        pos += 12 + length
    return _Header("png", width, height, orientation)


def _webp_header(data: bytes, prefix: bool) -> _Header:
    """RIFF size gives truncation; VP8/VP8L/VP8X give the canvas; an EXIF chunk gives orientation."""
    (riff_size,) = struct.unpack_from("<I", data, 4)
    if len(data) < 8 + riff_size and not prefix:
        raise ImageDecodeError(TRUNCATED, f"WebP has {len(data)} of {8 + riff_size} bytes")
    if len(data) < 30:
        raise ImageDecodeError(CORRUPT, "WebP too short for a frame header")
    kind = data[12:16]
    if kind == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageDecodeError(CORRUPT, "WebP VP8 frame without start code")
        w, h = struct.unpack_from("<HH", data, 26)
        return _Header("webp", w & 0x3FFF, h & 0x3FFF)
    if kind == b"VP8L":
        if data[20] != 0x2F:
            raise ImageDecodeError(CORRUPT, "WebP VP8L frame without signature")
        (bits,) = struct.unpack_from("<I", data, 21)
        return _Header("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if kind == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        orientation = 1
        pos = 12
        end = 8 + riff_size
        while data[20] & 0x08 and pos + 8 <= end:  # flag 0x08: the file has an EXIF chunk
            if pos + 8 > len(data):
                raise ImageDecodeError(TRUNCATED, "WebP EXIF chunk lies beyond the bytes given")
            fourcc, size = struct.unpack_from("<4sI", data, pos)
            if fourcc == b"EXIF":
                if pos + 8 + size > len(data):
                    raise ImageDecodeError(TRUNCATED, "WebP EXIF chunk lies beyond the bytes given")
                exif = data[pos + 8 : pos + 8 + size]
                orientation = _exif_orientation(exif[6:] if exif[:6] == b"Exif\x00\x00" else exif)
                break
            pos += 8 + size + (size & 1)
        return _Header("webp", w, h, orientation)
    raise ImageDecodeError(CORRUPT, f"WebP with unknown first chunk {kind!r}")


def _bmp_header(data: bytes, prefix: bool) -> _Header:
    """BITMAPINFOHEADER (or the old CORE header) dimensions; truncated if the pixel array is short."""
    if len(data) < 26:
        raise ImageDecodeError(TRUNCATED, "BMP shorter than its headers")
    (offbits, dib_size) = struct.unpack_from("<II", data, 10)
    if dib_size == 12:
        w, h = struct.unpack_from("<HH", data, 18)
        bpp = struct.unpack_from("<H", data, 24)[0]
        compression = 0
    elif dib_size >= 40:
        if len(data) < 14 + 40:
            raise ImageDecodeError(TRUNCATED, "BMP shorter than its headers")
        w, h, _planes, bpp, compression = struct.unpack_from("<iiHHI", data, 18)
    else:
        raise ImageDecodeError(CORRUPT, f"BMP with unknown DIB header size {dib_size}")
    w, h = abs(w), abs(h)  # negative height = top-down rows
    if compression in (0, 3, 6) and bpp in (1, 4, 8, 16, 24, 32) and not prefix:
        stride = ((w * bpp + 31) // 32) * 4
        if len(data) < offbits + stride * h:
            raise ImageDecodeError(TRUNCATED, f"BMP has {len(data)} of {offbits + stride * h} bytes")
    return _Header("bmp", w, h)


_TIFF_TYPE_SIZE = {1: 1, 3: 2, 4: 4, 16: 8}
_TIFF_TYPE_CODE = {1: "B", 3: "H", 4: "I", 16: "Q"}


def _tiff_header(data: bytes, prefix: bool) -> _Header:
    """IFD0 width, height, orientation; truncated when a strip or tile lies past the end of file."""
    end = "<" if data[:2] == b"II" else ">"
    n = len(data)
    if n < 8:
        raise ImageDecodeError(TRUNCATED, "TIFF shorter than its header")
    (ifd,) = struct.unpack_from(end + "I", data, 4)
    if ifd + 2 > n:
        raise ImageDecodeError(TRUNCATED, "TIFF ends before its first IFD")
    (count,) = struct.unpack_from(end + "H", data, ifd)
    if ifd + 2 + 12 * count > n:
        raise ImageDecodeError(TRUNCATED, "TIFF ends inside its first IFD")
    tags: dict[int, list[int]] = {}
    for i in range(count):
        tag, typ, cnt, _ = struct.unpack_from(end + "HHII", data, ifd + 2 + 12 * i)
        if tag not in (256, 257, 273, 274, 279, 324, 325) or typ not in _TIFF_TYPE_SIZE:
            continue
        nbytes = _TIFF_TYPE_SIZE[typ] * cnt
        at = ifd + 2 + 12 * i + 8
        if nbytes > 4:
            (at,) = struct.unpack_from(end + "I", data, at)
        if at + nbytes > n:
            raise ImageDecodeError(TRUNCATED, f"TIFF tag {tag} points past the end of the file")
        tags[tag] = list(struct.unpack_from(f"{end}{cnt}{_TIFF_TYPE_CODE[typ]}", data, at))
    if 256 not in tags or 257 not in tags:
        raise ImageDecodeError(CORRUPT, "TIFF without ImageWidth/ImageLength")
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if offsets and counts and len(offsets) == len(counts) and not prefix:
            last = max(o + c for o, c in zip(offsets, counts, strict=True))
            if last > n:
                raise ImageDecodeError(TRUNCATED, f"TIFF image data needs {last} bytes, file has {n}")
    orientation = tags.get(274, [1])[0]
    return _Header("tiff", tags[256][0], tags[257][0], orientation if 1 <= orientation <= 8 else 1)


_PARSERS = {"jpeg": _jpeg_header, "png": _png_header, "webp": _webp_header, "bmp": _bmp_header,
            "tiff": _tiff_header}


def _read_header(data: bytes, prefix: bool = False) -> _Header:
    """Sniff and walk the container; raises ImageDecodeError for every problem visible without decoding."""
    if not data:
        raise ImageDecodeError(EMPTY, "zero bytes")
    fmt = _sniff(data[:32])
    if fmt == "bigtiff":  # rare; let libtiff read it and check sizes after decoding
        return _Header("tiff", None, None)
    try:
        return _PARSERS[fmt](data, prefix)
    except struct.error as exc:  # a field ran past the end of the buffer
        raise ImageDecodeError(TRUNCATED, f"{fmt} header cut off ({exc})") from exc


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageDecodeError(TOO_SMALL, f"{width}x{height} is smaller than {MIN_SIDE}x{MIN_SIDE}")
    if width * height > max_pixels:
        raise ImageDecodeError(TOO_LARGE, f"{width}x{height} exceeds max_pixels={max_pixels}")


# ----------------------------------------------------------------------------- public API


def probe_size(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, prefix: bool = False) -> tuple[int, int]:
    """(width, height) as :func:`decode_image` would return them, from the header when possible.

    Raises the same ImageDecodeError reasons as decode_image for everything visible without
    decoding (empty, not an image, truncated, too small, too large). Only when the header carries
    no dimensions (BigTIFF) does it fall back to a full decode.

    ``prefix=True`` says ``data`` is only the first bytes of the file (e.g. a 256 KiB ranged read):
    the checks that need the whole file (truncation) are skipped, and "truncated" then means "the
    header lies beyond these bytes; read the whole file and call again with prefix=False".
    """
    data = bytes(data)  # accept bytearray/memoryview; bytes.find and the regex need bytes
    header = _read_header(data, prefix)
    size = header.oriented_size()
    if size is None:
        if prefix:
            raise ImageDecodeError(TRUNCATED, f"{header.fmt} size needs the whole file")
        h, w = decode_image(data, max_pixels=max_pixels).shape[:2]
        return w, h
    _check_size(size[0], size[1], max_pixels)
    return size


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to a uint8 H x W x 3 RGB array, EXIF-oriented (rules in the module doc)."""
    data = bytes(data)
    header = _read_header(data)
    size = header.oriented_size()
    if size is not None:
        _check_size(size[0], size[1], max_pixels)  # before decoding: no decompression bombs
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        raw = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageDecodeError(CORRUPT, f"{header.fmt} decoder failed: {exc}") from exc
    if raw is None or raw.size == 0:
        raise ImageDecodeError(CORRUPT, f"{header.fmt} decoder could not read the pixel data")
    rgb = _to_rgb8(raw)
    if header.fmt in _SELF_ORIENTED:
        rgb = _apply_orientation(rgb, header.orientation)
    h, w = rgb.shape[:2]
    if size is None:
        _check_size(w, h, max_pixels)
    elif (w, h) != size:
        raise ImageDecodeError(CORRUPT, f"header says {size[0]}x{size[1]}, decoder gave {w}x{h}")
    return np.ascontiguousarray(rgb)


def _to_rgb8(raw: np.ndarray) -> np.ndarray:
    """OpenCV's IMREAD_UNCHANGED output (gray/BGR/BGRA, 8/16-bit/float) -> uint8 RGB, alpha over black."""
    img = raw if raw.ndim == 3 else raw[:, :, None]
    channels = img.shape[2]
    if channels not in (1, 2, 3, 4):
        raise ImageDecodeError(CORRUPT, f"unsupported channel count {channels}")
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
    elif img.dtype in (np.float32, np.float64):
        img = np.clip(img, 0.0, 1.0)
        scale = 1.0
    else:
        raise ImageDecodeError(CORRUPT, f"unsupported sample type {img.dtype}")
    color = img[:, :, :3] if channels >= 3 else img[:, :, :1]
    alpha = img[:, :, 3:4] if channels == 4 else (img[:, :, 1:2] if channels == 2 else None)
    if img.dtype == np.uint8 and alpha is None:
        out = color
    elif img.dtype == np.uint8:
        out = ((color.astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    elif img.dtype == np.uint16 and alpha is None:
        out = ((color.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257)
    else:
        unit = color.astype(np.float32) / scale
        if alpha is not None:
            unit = unit * (alpha.astype(np.float32) / scale)
        out = np.rint(unit * 255.0).astype(np.uint8)
    if out.shape[2] == 1:
        return cv2.cvtColor(out, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def _apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels into displayed pixels for EXIF orientation 1..8."""
    if orientation == 2:
        return img[:, ::-1]
    if orientation == 3:
        return img[::-1, ::-1]
    if orientation == 4:
        return img[::-1]
    if orientation == 5:
        return img.swapaxes(0, 1)
    if orientation == 6:
        return img.swapaxes(0, 1)[:, ::-1]
    if orientation == 7:
        return img[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return img.swapaxes(0, 1)[::-1]
    return img
