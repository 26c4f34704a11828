"""Strict parser of the IDX format (LeCun's MNIST files, gzip-compressed).

Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then one
big-endian uint32 per dimension. The payload must hold exactly prod(dims) values: a truncated or
padded file is an ``IDXError``, never a silently short array.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

UBYTE = 0x08


class IDXError(ValueError):
    """The file is not a well-formed IDX file of the expected kind."""


def parse_idx(data: bytes, name: str = "<bytes>", ndim: int | None = None) -> np.ndarray:
    if len(data) < 4:
        raise IDXError(f"{name}: {len(data)} bytes is too short for an IDX header")
    zero, dtype, nd = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != UBYTE:
        raise IDXError(f"{name}: bad magic number 0x{data[:4].hex()} (expected 0x000008NN: unsigned-byte IDX)")
    if ndim is not None and nd != ndim:
        raise IDXError(f"{name}: has {nd} dimension(s), expected {ndim}")
    header = 4 + 4 * nd
    if len(data) < header:
        raise IDXError(f"{name}: truncated header")
    dims = struct.unpack(f">{nd}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(data) - header
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        raise IDXError(f"{name}: {kind}: header says {dims} = {expected} values, payload holds {got} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_gz(path: str | Path, ndim: int | None = None) -> np.ndarray:
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes())
    except (EOFError, OSError, zlib.error) as err:
        raise IDXError(f"{path}: not a complete gzip file ({err}); delete it and run the download step again") from None
    return parse_idx(raw, str(path), ndim)


def read_images_labels(images: str | Path, labels: str | Path) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx_gz(images, ndim=3)
    y = read_idx_gz(labels, ndim=1)
    if len(x) != len(y):
        raise IDXError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    return x, y
