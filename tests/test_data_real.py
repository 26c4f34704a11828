"""The split step on the real Fashion-MNIST files of the Debian package."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.dataset import read_split
from components.idx import read_images_labels
from components.split import SPLIT_FILES

SIZES = {
    "full_train": 55_000, "full_valid": 5_000, "full_test": 10_000,
    "a_train": 43_986, "b_train": 200,
}


@pytest.fixture(scope="module")
def splits(real_splits):
    return {f.removesuffix(".parquet"): read_split(real_splits / "splits" / f) for f in SPLIT_FILES}


def test_exact_sizes(splits):
    for name, n in SIZES.items():
        assert len(splits[name]) == n, name
    for part in ("valid", "test"):  # A and B partition each full split
        assert len(splits[f"a_{part}"]) + len(splits[f"b_{part}"]) == len(splits[f"full_{part}"])


def test_task_a_has_no_sandal_or_shirt_and_labels_0_to_7(splits):
    for part in ("train", "valid", "test"):
        a = splits[f"a_{part}"]
        assert not np.isin(a.source_label, [5, 6]).any()
        assert set(np.unique(a.y)) == set(range(8))
        # 0-4 unchanged, 7/8/9 -> 5/6/7
        expected = np.where(a.source_label > 6, a.source_label - 2, a.source_label)
        np.testing.assert_array_equal(a.y, expected)


def test_task_b_is_shirt_vs_sandal_first_200(splits, debian_dir):
    b = splits["b_train"]
    assert len(b) == 200
    assert set(np.unique(b.source_label)) == {5, 6}
    np.testing.assert_array_equal(b.y, (b.source_label == 6).astype(np.uint8))
    # the FIRST 200 B images of the train split (train = training file rows 5000..59999)
    _, y = read_images_labels(debian_dir / "train-images-idx3-ubyte.gz", debian_dir / "train-labels-idx1-ubyte.gz")
    rows = np.flatnonzero(np.isin(y[5000:], [5, 6]))[:200] + 5000
    np.testing.assert_array_equal(b.source_index, rows)
    for part in ("valid", "test"):
        full, bb = splits[f"full_{part}"], splits[f"b_{part}"]
        assert len(bb) == int(np.isin(full.source_label, [5, 6]).sum())


def test_no_image_in_two_splits(splits):
    train, valid, test = (splits[f"full_{p}"] for p in ("train", "valid", "test"))
    assert np.intersect1d(train.source_index, valid.source_index).size == 0
    np.testing.assert_array_equal(valid.source_index, np.arange(5000))  # the FIRST 5,000
    assert len(np.union1d(train.source_index, valid.source_index)) == 60_000
    assert {train.meta["source_file"], valid.meta["source_file"]} == {"train"} and test.meta["source_file"] == "test"
    for part in ("train", "valid", "test"):  # A and B are subsets of their own split only
        full = set(splits[f"full_{part}"].source_index.tolist())
        assert set(splits[f"a_{part}"].source_index.tolist()) <= full
        assert set(splits[f"b_{part}"].source_index.tolist()) <= full


def test_parquet_schema_and_metadata(real_splits, params):
    path = real_splits / "splits" / "full_train.parquet"
    schema = pq.read_schema(path)
    pixels = schema.field("pixels").type
    assert pa.types.is_fixed_size_binary(pixels) and pixels.byte_width == 784
    assert str(schema.field("label").type) == "uint8"
    meta = read_split(path).meta
    assert meta["class_names"][6] == "Shirt"
    assert meta["source_sha256"]["train-images-idx3-ubyte.gz"] == params.data.files.train_images.sha256
    assert meta["image_shape"] == [28, 28]


def test_pixels_round_trip(splits, debian_dir):
    x, y = read_images_labels(debian_dir / "t10k-images-idx3-ubyte.gz", debian_dir / "t10k-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(splits["full_test"].x, x)
    np.testing.assert_array_equal(splits["full_test"].y, y)


def test_dataset_card(real_splits):
    card = json.loads((real_splits / "card.json").read_text())
    assert card["a_train"]["rows"] == 43_986
    assert card["b_train"]["class_0"] + card["b_train"]["class_1"] == 200
    assert sum(card["full_test"][f"class_{i}"] for i in range(10)) == 10_000
    assert "| b_train | 200 |" in (real_splits / "card.md").read_text()


def test_list_form_splits_still_read(splits, tmp_path):
    """Splits written before the byte form (pixels as fixed_size_list<uint8>) read to the same arrays."""
    from components.dataset import META_KEY

    s = splits["b_train"]
    flat = s.x.reshape(len(s), -1)
    table = pa.table({"pixels": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.uint8()), flat.shape[1]),
                      "label": s.y, "source_label": s.source_label, "source_index": s.source_index})
    table = table.replace_schema_metadata({META_KEY: json.dumps(s.meta).encode()})
    pq.write_table(table, tmp_path / "old.parquet")
    old = read_split(tmp_path / "old.parquet")
    np.testing.assert_array_equal(old.x, s.x)
    assert old.x.shape == (200, 28, 28) and old.x.dtype == np.uint8
    np.testing.assert_array_equal(old.source_index, s.source_index)
