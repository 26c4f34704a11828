"""Damaged split files fail loudly on every read (issue 33, item 6), whoever runs the stage.

Before: 2,000 flipped bytes inside a split's Parquet file went unnoticed (standardize and training exited 0 with
changed pixel means); only ``dvc status`` compares file hashes. Now every page carries a CRC-32 and the metadata
the SHA-256 of the decoded contents; ``read_split`` checks both.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest

from components import standardize
from components.dataset import DIGEST_KEY, META_KEY, CorruptSplitError, Split, read_meta, read_split, write_split
from components.idx import read_images_labels

ROWS = 300


@pytest.fixture(scope="module")
def real_rows(debian_dir) -> Split:
    """The first 300 rows of the real training file, as the split step would hold them."""
    x, y = read_images_labels(debian_dir / "train-images-idx3-ubyte.gz", debian_dir / "train-labels-idx1-ubyte.gz")
    meta = {"dataset": "fashion_mnist", "split": "train", "task": "full", "class_names": [str(i) for i in range(10)]}
    return Split(x[:ROWS].copy(), y[:ROWS].copy(), y[:ROWS].copy(), np.arange(ROWS, dtype=np.int32), meta)


@pytest.fixture
def written(real_rows, tmp_path):
    path = tmp_path / "splits" / "full_train.parquet"
    write_split(path, real_rows)
    return path


def pixel_chunk(path) -> tuple[int, int]:
    """(start, length) of the ``pixels`` column chunk: its data pages, in the file's bytes."""
    col = pq.ParquetFile(path).metadata.row_group(0).column(0)
    assert col.path_in_schema == "pixels"
    return col.data_page_offset, col.total_compressed_size


def flip_bytes(path, start: int, count: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_middle_of_pixels(path, count: int = 2000) -> None:
    start, length = pixel_chunk(path)
    count = min(count, length // 2)
    flip_bytes(path, start + length // 2 - count // 2, count)


def assert_clear_error(err: pytest.ExceptionInfo, path) -> str:
    msg = str(err.value)
    assert str(path) in msg and "is corrupt" in msg, msg
    assert "dvc repro split" in msg and f"dvc checkout {path.parent}" in msg, msg
    return msg


def test_intact_file_reads_back_bit_identical(real_rows, written):
    s = read_split(written)
    assert s.x.dtype == np.uint8 and s.x.shape == (ROWS, 28, 28)
    np.testing.assert_array_equal(s.x, real_rows.x)
    np.testing.assert_array_equal(s.y, real_rows.y)
    np.testing.assert_array_equal(s.source_label, real_rows.source_label)
    np.testing.assert_array_equal(s.source_index, real_rows.source_index)
    assert s.source_index.dtype == np.int32
    meta = read_meta(written)
    assert len(meta[DIGEST_KEY]) == 64 and s.meta[DIGEST_KEY] == meta[DIGEST_KEY]
    assert {k: v for k, v in meta.items() if k not in (DIGEST_KEY, "image_shape")} == real_rows.meta


def test_writer_is_deterministic(real_rows, written, tmp_path):
    """Same arrays → same bytes (DVC caches by file hash), CRCs and digest included."""
    again = tmp_path / "again.parquet"
    write_split(again, real_rows)
    assert again.read_bytes() == written.read_bytes()


def test_flipped_bytes_in_the_pixel_pages_raise(written):
    """The issue's defect: 2,000 flipped bytes inside the data → a clear error, not changed pixels."""
    start, length = pixel_chunk(written)
    assert length > 4000, "the pixel pages must hold the flipped region"
    flip_middle_of_pixels(written, 2000)
    with pytest.raises(CorruptSplitError) as err:
        read_split(written)
    msg = assert_clear_error(err, written)
    assert "CRC" in msg or "checksum" in msg.lower(), msg  # caught by the page checksum, before decoding


def test_flips_in_the_real_train_split_raise(real_splits, tmp_path):
    """The issue's case at full size: 2,000 flipped bytes at places where zstd alone often decodes garbage
    silently (15 of 20 random places did with the old writer); each must raise now."""
    src = (real_splits / "splits" / "full_train.parquet").read_bytes()
    path = tmp_path / "data" / "splits" / "full_train.parquet"
    path.parent.mkdir(parents=True)
    for frac in (0.3, 0.45, 0.5, 0.55, 0.7):
        path.write_bytes(src)
        flip_bytes(path, int(len(src) * frac), 2000)
        with pytest.raises(CorruptSplitError) as err:
            read_split(path)
        assert_clear_error(err, path)
    path.write_bytes(src)
    assert len(read_split(path)) == 55_000  # the intact copy still reads


@pytest.mark.parametrize("offset", [0.1, 0.5, 0.9])
def test_a_single_flipped_byte_anywhere_in_the_pixels_raises(written, offset):
    start, length = pixel_chunk(written)
    flip_bytes(written, start + int(length * offset), 1)
    with pytest.raises(CorruptSplitError) as err:
        read_split(written)
    assert_clear_error(err, written)


def test_standardize_fails_on_a_damaged_split(written, tmp_path):
    """A stage run by hand (or on Kubeflow) no longer fits a scaler on damaged pixels."""
    flip_middle_of_pixels(written)
    with pytest.raises(CorruptSplitError):
        standardize.run(written.parent, tmp_path / "scaler.npz", tmp_path / "scaler.json")
    assert not (tmp_path / "scaler.npz").exists()


def rewrite(path, table, **kwargs) -> None:
    pq.write_table(table, path, use_dictionary=False, **kwargs)


def test_content_hash_catches_changed_pixels_with_valid_page_checksums(written):
    """Pixels changed and the file rewritten with fresh page CRCs but the old digest: only the hash can tell."""
    table = pq.read_table(written)
    pixels = np.frombuffer(table.column("pixels").combine_chunks().buffers()[1], np.uint8).copy()
    pixels[1000:3000] ^= 0xFF
    import pyarrow as pa

    changed = pa.FixedSizeBinaryArray.from_buffers(table.schema.field("pixels").type, len(table),
                                                   [None, pa.py_buffer(pixels)])
    table = table.set_column(0, table.schema.field("pixels"), changed)  # keeps the schema metadata, old digest
    rewrite(written, table, compression="zstd", write_page_checksum=True)
    assert json.loads(pq.read_schema(written).metadata[META_KEY])[DIGEST_KEY] == read_meta(written)[DIGEST_KEY]
    pq.read_table(written, page_checksum_verification=True)  # the pages themselves are consistent
    with pytest.raises(CorruptSplitError, match="content hash mismatch") as err:
        read_split(written)
    assert_clear_error(err, written)


@pytest.mark.parametrize("column", ["label", "source_label", "source_index"])
def test_content_hash_covers_every_column(written, column):
    table = pq.read_table(written)
    values = table.column(column).to_numpy().copy()
    values[7] += 1
    i = table.schema.get_field_index(column)
    import pyarrow as pa

    table = table.set_column(i, table.schema.field(column), pa.array(values, table.schema.field(column).type))
    rewrite(written, table, compression="zstd", write_page_checksum=True)
    with pytest.raises(CorruptSplitError, match="content hash mismatch"):
        read_split(written)


def test_content_hash_catches_bit_flips_in_a_file_without_page_checksums(written):
    """Flipped bytes in uncompressed pages without CRCs (another writer, an older pyarrow): the hash catches them."""
    rewrite(written, pq.read_table(written), compression="none", write_page_checksum=False)
    flip_middle_of_pixels(written, 2000)
    raw = pq.read_table(written, page_checksum_verification=True)  # decodes without complaint: nothing to verify
    assert len(raw) == ROWS
    with pytest.raises(CorruptSplitError, match="content hash mismatch") as err:
        read_split(written)
    assert_clear_error(err, written)


def test_rewriting_a_read_split_refreshes_the_digest(written):
    """A Split read from a file carries that file's digest; writing changed pixels must not keep it."""
    s = read_split(written)
    write_split(written, Split(255 - s.x, s.y, s.source_label, s.source_index, s.meta))
    t = read_split(written)
    np.testing.assert_array_equal(t.x, 255 - s.x)
    assert t.meta[DIGEST_KEY] != s.meta[DIGEST_KEY]


def test_files_without_a_digest_still_read(real_rows, written, caplog):
    """Splits written before this change: read as before (no hash to check), with one warning."""
    table = pq.read_table(written)
    meta = json.loads(table.schema.metadata[META_KEY])
    del meta[DIGEST_KEY]
    rewrite(written, table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), compression="zstd")
    with caplog.at_level(logging.WARNING, logger="components.dataset"):
        s = read_split(written)
        read_split(written)
    np.testing.assert_array_equal(s.x, real_rows.x)
    assert DIGEST_KEY not in s.meta
    warnings = [r for r in caplog.records if "no content hash" in r.getMessage()]
    assert len(warnings) == 1 and str(written) in warnings[0].getMessage()


def test_cifar10_splits_name_their_own_step(real_rows, tmp_path):
    path = tmp_path / "data" / "splits" / "full_test.parquet"
    write_split(path, Split(real_rows.x, real_rows.y, real_rows.source_label, real_rows.source_index,
                            dict(real_rows.meta, dataset="cifar10")))
    table = pq.read_table(path)
    y = table.column("label").to_numpy().copy()
    y[0] ^= 1
    import pyarrow as pa

    rewrite(path, table.set_column(1, table.schema.field("label"), pa.array(y, pa.uint8())), compression="zstd")
    with pytest.raises(CorruptSplitError, match=r"dvc repro cifar10_split.*dvc checkout .*data/splits"):
        read_split(path)


def test_missing_file_is_not_reported_as_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_split(tmp_path / "nope.parquet")


def test_empty_split_round_trips(real_rows, tmp_path):
    path = tmp_path / "empty.parquet"
    write_split(path, Split(real_rows.x[:0], real_rows.y[:0], real_rows.source_label[:0], real_rows.source_index[:0],
                            real_rows.meta))
    s = read_split(path)
    assert s.x.shape == (0, 28, 28) and len(s) == 0
