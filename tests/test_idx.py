"""The IDX parser is strict: a corrupt or truncated file is a clear error, never a short array."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from components.idx import IDXError, parse_idx, read_idx_gz, read_images_labels


def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def test_round_trip(tmp_path):
    arr = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    (tmp_path / "x.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx_gz(tmp_path / "x.gz", ndim=3), arr)


def test_truncated_payload_is_rejected(tmp_path):
    data = idx_bytes(np.zeros((10, 28, 28), np.uint8))[:-100]
    (tmp_path / "t.gz").write_bytes(gzip.compress(data))
    with pytest.raises(IDXError, match=r"truncated: header says \(10, 28, 28\) = 7840 values, payload holds 7740"):
        read_idx_gz(tmp_path / "t.gz", ndim=3)


def test_truncated_gzip_is_rejected(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(5000, dtype=np.uint8).reshape(5000) % 251))
    (tmp_path / "t.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IDXError, match="not a complete gzip file"):
        read_idx_gz(tmp_path / "t.gz")


def test_trailing_bytes_bad_magic_and_dims():
    good = idx_bytes(np.zeros((2, 3), np.uint8))
    with pytest.raises(IDXError, match="trailing bytes"):
        parse_idx(good + b"\x00")
    with pytest.raises(IDXError, match="bad magic"):
        parse_idx(b"\x00\x00\x0d\x02" + good[4:])
    with pytest.raises(IDXError, match="expected 3"):
        parse_idx(good, ndim=3)
    with pytest.raises(IDXError, match="too short"):
        parse_idx(b"\x00\x00")


def test_image_label_count_mismatch(tmp_path):
    (tmp_path / "x.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((4, 2, 2), np.uint8))))
    (tmp_path / "y.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((3,), np.uint8))))
    with pytest.raises(IDXError, match="4 images but .* 3 labels"):
        read_images_labels(tmp_path / "x.gz", tmp_path / "y.gz")
