"""Standardization statistics come from the training split only."""
from __future__ import annotations

import shutil

import numpy as np

from components import standardize
from components.dataset import Split, read_split, write_split


def test_statistics_equal_the_train_split(real_splits, tmp_path):
    scaler = tmp_path / "scaler.npz"
    standardize.run(real_splits / "splits", scaler, tmp_path / "m.json")
    mean, std = standardize.load_scaler(scaler)
    x = read_split(real_splits / "splits" / "full_train.parquet").x.reshape(55_000, -1) / 255.0
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(std, np.where(x.std(axis=0) == 0, 1.0, x.std(axis=0)), atol=1e-6)
    z = standardize.apply_scaler(read_split(real_splits / "splits" / "full_train.parquet").x[:5000], mean, std)
    assert np.isfinite(z).all()


def test_changing_valid_does_not_change_the_scaler(real_splits, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(real_splits / "splits", a)
    shutil.copytree(real_splits / "splits", b)
    v = read_split(b / "full_valid.parquet")
    write_split(b / "full_valid.parquet", Split(255 - v.x, v.y, v.source_label, v.source_index, v.meta))
    for d in (a, b):
        standardize.run(d, d / "scaler.npz", d / "m.json")
    for k in (0, 1):
        np.testing.assert_array_equal(standardize.load_scaler(a / "scaler.npz")[k], standardize.load_scaler(b / "scaler.npz")[k])
    # ...while changing the TRAIN split does change it (the test can fail)
    t = read_split(b / "full_train.parquet")
    write_split(b / "full_train.parquet", Split(255 - t.x, t.y, t.source_label, t.source_index, t.meta))
    standardize.run(b, b / "scaler.npz", b / "m.json")
    assert not np.array_equal(standardize.load_scaler(a / "scaler.npz")[0], standardize.load_scaler(b / "scaler.npz")[0])


def test_constant_pixel_std_is_guarded():
    x = np.zeros((10, 2, 2), np.uint8)
    x[:, 0, 0] = np.arange(10)
    mean, std = standardize.fit_scaler(x)
    assert std[1] == std[2] == std[3] == 1.0
    z = standardize.apply_scaler(x, mean, std)
    assert np.isfinite(z).all() and (z[:, 1:].reshape(10, -1)[:, 1:] == 0).all()
