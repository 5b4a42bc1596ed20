"""Decode-once image cache: image files -> one uint8 ``.npy`` memmap [N, C, S, S].

Resize policy: every image is resized straight to a square ``S x S`` (no crop, aspect ratio not
kept) with PIL's antialiased bicubic filter, so a lesion at the border is never cropped away.
16-bit / float images are scaled to 0-255 by their own maximum before casting. DICOM files
(``.dcm``) are read with pydicom: modality LUT then VOI LUT / window applied, stretched to 0-255 by
their own range, and MONOCHROME1 inverted so that bone is bright as in MONOCHROME2.

A cache lives in ``cache_dir`` (default ``~/.cache/medpeft``) as ``<kind>-<key>.npy`` plus a
``.json`` sidecar. The key hashes the dataset kind, the sorted file list with sizes and mtimes,
the image size and the channels, so changed inputs get a new cache and an unchanged dataset is
never decoded twice. Both files are written to a temp name and renamed; the sidecar is renamed
last and acts as the commit marker, so a crash never leaves a cache that is later trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("medpeft")

DEFAULT_CACHE_DIR = "~/.cache/medpeft"
DICOM_SUFFIXES = (".dcm", ".dicom")
_FORMAT_VERSION = 1  # bump when the decode / resize policy changes so old caches are not reused


def decode_image(path: str | Path, size: int, channels: int) -> np.ndarray:
    """Decodes one image file into a uint8 array [channels, size, size].

    Raises:
        ValueError: when the file cannot be read or is truncated (names the file).
    """
    try:
        if is_dicom(path):
            img = _to_8bit(Image.fromarray(read_dicom(path)), channels)
        else:
            with Image.open(path) as src:
                src.load()  # forces a full decode so truncated files fail here, not in a worker
                img = _to_8bit(src, channels)
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    except Exception as err:  # PIL raises OSError, SyntaxError, EOFError, zlib.error... for bad files
        raise ValueError(
            f"cannot read image {path} ({err}); replace or delete the file, or pass skip_corrupt: true."
        ) from err
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def is_dicom(path: str | Path) -> bool:
    """Whether a file is DICOM, judged by its suffix (``.dcm`` / ``.dicom``)."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES


def read_dicom(path: str | Path) -> np.ndarray:
    """The first frame of a DICOM file as uint8 [H, W] (grayscale) or [H, W, 3] (colour).

    Grayscale: modality LUT (rescale slope / intercept), then the VOI LUT or window of the file,
    then a stretch of the result's own range to 0-255; MONOCHROME1 (high values dark) is inverted.
    """
    import pydicom  # imported here: only DICOM datasets need it
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if not photometric.startswith("MONOCHROME"):
        return np.asarray(arr, dtype=np.uint8)  # colour DICOM: pydicom already converted it to RGB
    arr = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    if photometric == "MONOCHROME1":
        arr = 255.0 - arr
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def image_channels(path: str | Path) -> int:
    """Native channels of an image file from its header: 1 for grayscale modes, else 3."""
    if is_dicom(path):
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:  # pydicom raises InvalidDicomError, OSError, EOFError...
            raise ValueError(
                f"cannot read DICOM {path} ({err}); pass channels explicitly or fix the file."
            ) from err
        return 3 if int(ds.get("SamplesPerPixel", 1) or 1) == 3 else 1
    try:
        with Image.open(path) as img:
            mode = img.mode
    except OSError as err:
        raise ValueError(
            f"cannot read image {path} ({err}); pass channels explicitly or fix the file."
        ) from err
    return 1 if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") else 3


class ImageCache:
    """The cached pixels of a list of image files.

    Attributes:
        path: The ``.npy`` file; rows follow the order of ``files`` as given.
        valid: Bool per file; False for files skipped as corrupt.
    """

    def __init__(self, path: Path, valid: np.ndarray) -> None:
        self.path = path
        self.valid = valid

    def open(self) -> np.ndarray:
        """Opens the pixels read-only as a memmap."""
        return np.load(self.path, mmap_mode="r")


def cache_key(kind: str, files: Sequence[str | Path], size: int, channels: int) -> str:
    """Hash of everything the cached pixels depend on."""
    h = hashlib.sha256(json.dumps([_FORMAT_VERSION, kind, int(size), int(channels)]).encode())
    for f in sorted(os.path.abspath(p) for p in files):
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    # Order of rows is part of what is cached, so it is hashed too.
    h.update(hashlib.sha256("\n".join(map(str, files)).encode()).digest())
    return h.hexdigest()[:24]


def build_or_load(
    kind: str,
    files: Sequence[str | Path],
    size: int,
    channels: int,
    cache_dir: str | Path | None = None,
    skip_corrupt: bool = False,
) -> ImageCache:
    """Returns the cache of ``files``, decoding them only when no valid cache exists.

    Args:
        kind: Dataset kind, part of the file name and key (e.g. ``"folder"``).
        files: Image paths; cache rows follow this order.
        size: Output side length S.
        channels: 1 (grayscale) or 3 (RGB).
        cache_dir: Where caches live; None means ``~/.cache/medpeft``.
        skip_corrupt: Keep going past unreadable files (marked invalid, warned once with the count)
            instead of raising.
    """
    root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(kind, files, size, channels)
    npy, meta = root / f"{kind}-{key}.npy", root / f"{kind}-{key}.json"
    shape = (len(files), channels, size, size)
    cache = _load(npy, meta, key, shape)
    if cache is None:
        cache = _build(npy, meta, key, files, shape, skip_corrupt)
    bad = np.flatnonzero(~cache.valid)
    if len(bad):
        if not skip_corrupt:
            raise ValueError(
                f"cannot read image {files[bad[0]]} ({len(bad)} unreadable in total); replace or delete "
                "it, or pass skip_corrupt: true."
            )
        warnings.warn(f"skipped {len(bad)} unreadable image(s), e.g. {files[bad[0]]}.", stacklevel=2)
    return cache


def _load(npy: Path, meta: Path, key: str, shape: tuple[int, ...]) -> ImageCache | None:
    if not (npy.exists() and meta.exists()):
        return None
    try:
        info = json.loads(meta.read_text())
        arr = np.load(npy, mmap_mode="r")  # checks the header against the file length
        ok = (
            info.get("key") == key
            and tuple(arr.shape) == shape
            and arr.dtype == np.uint8
            and npy.stat().st_size == info.get("bytes")
            and len(info.get("valid", [])) == shape[0]
        )
        del arr
    except Exception:  # any unreadable header / sidecar means the cache cannot be trusted
        ok = False
    if not ok:
        log.warning("image cache %s is corrupt or stale; rebuilding it.", npy)
        return None
    return ImageCache(npy, np.asarray(info["valid"], dtype=bool))


def _build(
    npy: Path, meta: Path, key: str, files: Sequence[str | Path], shape: tuple[int, ...], skip_corrupt: bool
) -> ImageCache:
    log.info("decoding %d images into cache %s", len(files), npy)
    valid = np.ones(len(files), dtype=bool)
    fd, tmp = tempfile.mkstemp(dir=npy.parent, prefix=npy.stem, suffix=".tmp.npy")
    os.close(fd)
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for i, f in enumerate(files):
            try:
                arr[i] = decode_image(f, shape[2], shape[1])
            except ValueError:
                if not skip_corrupt:
                    raise
                valid[i] = False
        arr.flush()
        del arr
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        info = {"key": key, "bytes": os.path.getsize(tmp), "valid": valid.tolist(), "files": len(files)}
        os.replace(tmp, npy)
        _atomic_write_text(meta, json.dumps(info))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return ImageCache(npy, valid)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _to_8bit(img: Image.Image, channels: int) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High-bit-depth medical images: scale by the image's own maximum so nothing clips.
        arr = np.asarray(img, dtype=np.float32)
        peak = float(arr.max()) if arr.size else 0.0
        arr = arr * (255.0 / peak) if peak > 0 else arr
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.convert("L" if channels == 1 else "RGB")
