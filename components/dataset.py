"""Parquet storage of image splits: an explicit pyarrow schema and metadata that travels with the file.

Schema: ``pixels`` fixed_size_binary[H*W*C] (the image's uint8 bytes, row-major; Parquet
FIXED_LEN_BYTE_ARRAY), ``label`` uint8 (the task's label),
``source_label`` uint8 (the original class), ``source_index`` int32 (row in the source file).
File metadata (``b"pipeline"`` key, JSON): split name, task, class names, image shape, the SHA-256 of
the source files.

Why bytes and not ``fixed_size_list<uint8>``: Parquet has no 8-bit physical type, so a uint8 list is stored as
INT32 values with repetition levels (172 MB to decode for the Fashion-MNIST train split); as fixed-length bytes
the column decodes to the very same array 6x faster (0.06 s vs 0.36 s for that split) from a file 30 %
smaller, and every training stage reads three splits. Files in the list form are still read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .io import atomic_path

META_KEY = b"pipeline"


def schema(n_pixels: int, metadata: dict[str, Any] | None = None) -> pa.Schema:
    s = pa.schema(
        [
            pa.field("pixels", pa.binary(n_pixels), nullable=False),
            pa.field("label", pa.uint8(), nullable=False),
            pa.field("source_label", pa.uint8(), nullable=False),
            pa.field("source_index", pa.int32(), nullable=False),
        ]
    )
    if metadata is not None:
        s = s.with_metadata({META_KEY: json.dumps(metadata, sort_keys=True).encode()})
    return s


@dataclass
class Split:
    x: np.ndarray  # (n, H, W[, C]) uint8
    y: np.ndarray  # (n,) uint8, the task's label
    source_label: np.ndarray  # (n,) uint8
    source_index: np.ndarray  # (n,) int32
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)


def write_split(path: str | Path, split: Split) -> None:
    n = len(split)
    flat = np.ascontiguousarray(split.x.reshape(n, -1), dtype=np.uint8)
    n_pixels = flat.shape[1]
    meta = dict(split.meta, image_shape=list(split.x.shape[1:]))
    pixels = pa.FixedSizeBinaryArray.from_buffers(pa.binary(n_pixels), n, [None, pa.py_buffer(flat)])
    table = pa.Table.from_arrays(
        [
            pixels,
            pa.array(split.y.astype(np.uint8), type=pa.uint8()),
            pa.array(split.source_label.astype(np.uint8), type=pa.uint8()),
            pa.array(split.source_index.astype(np.int32), type=pa.int32()),
        ],
        schema=schema(n_pixels, meta),
    )
    with atomic_path(path) as tmp:
        # no dictionary encoding, fixed compression: the same arrays give the same bytes
        pq.write_table(table, tmp, compression="zstd", use_dictionary=False, write_statistics=False)


def read_meta(path: str | Path) -> dict[str, Any]:
    md = pq.read_schema(path).metadata or {}
    return json.loads(md[META_KEY]) if META_KEY in md else {}


def read_split(path: str | Path) -> Split:
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    shape = tuple(meta.get("image_shape", ()))
    col = table.column("pixels").combine_chunks()
    n = len(table)
    if pa.types.is_fixed_size_binary(col.type):
        width = col.type.byte_width
        flat = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=n * width, offset=col.offset * width)
    else:  # fixed_size_list<uint8>, as written before the byte form
        flat = col.values.to_numpy(zero_copy_only=False)
    x = flat.reshape((n, *shape)) if shape else flat.reshape(n, -1)
    return Split(
        x=x,
        y=table.column("label").to_numpy(),
        source_label=table.column("source_label").to_numpy(),
        source_index=table.column("source_index").to_numpy(),
        meta=meta,
    )
