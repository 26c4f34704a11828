"""CIFAR-10 (exercise 8) on a tiny tarball the tests write in the real format (python pickle batches of
20 images each), served over HTTP on 127.0.0.1: download, checksums, safe reading, strict parsing,
split, the whole pipeline, and its DVC project of its own."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from components import cifar10
from components.cifar10 import ArchiveError, parse_batch, read_archive
from components.config import CIFAR10_CLASSES, Cifar10Params, validate_params
from components.dataset import read_meta, read_split
from components.download import DownloadError

from .conftest import ROOT, copy_repo, http_server, run

PER_BATCH, TEST_ROWS, VALID = 20, 20, 30
TRAIN_ROWS = 5 * PER_BATCH
NAME = "cifar-10-python.tar.gz"


def add_member(tar: tarfile.TarFile, name: str, blob: bytes = b"", **info) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(blob)
    for k, v in info.items():
        setattr(ti, k, v)
    tar.addfile(ti, io.BytesIO(blob) if blob else None)


def batch_blob(data: np.ndarray, labels: list[int], label: str) -> bytes:
    """One batch as the authors pickled it: a dict with bytes keys, uint8 (N, 3072) data, a list of labels."""
    return pickle.dumps({b"batch_label": label.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}, protocol=2)


def write_tarball(path: Path, seed: int = 0, extra=None) -> dict[str, np.ndarray]:
    """A cifar-10-python.tar.gz in the real layout; returns the raw rows and labels written."""
    rng = np.random.default_rng(seed)
    raw = {"train_x": rng.integers(0, 256, (TRAIN_ROWS, 3072), dtype=np.uint8),
           "train_y": rng.integers(0, 10, TRAIN_ROWS).astype(np.uint8),
           "test_x": rng.integers(0, 256, (TEST_ROWS, 3072), dtype=np.uint8),
           "test_y": rng.integers(0, 10, TEST_ROWS).astype(np.uint8)}
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, "cifar-10-batches-py", type=tarfile.DIRTYPE, mode=0o755)
        meta = {b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_cases_per_batch": PER_BATCH, b"num_vis": 3072}
        add_member(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2))
        for i in range(5):
            rows = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
            add_member(tar, f"cifar-10-batches-py/data_batch_{i + 1}",
                       batch_blob(raw["train_x"][rows], raw["train_y"][rows].tolist(), f"training batch {i + 1} of 5"))
        add_member(tar, "cifar-10-batches-py/test_batch", batch_blob(raw["test_x"], raw["test_y"].tolist(), "testing batch 1 of 1"))
        add_member(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
        if extra:
            extra(tar)
    return raw


def digests(path: Path) -> dict[str, str]:
    blob = path.read_bytes()
    return {"md5": hashlib.md5(blob).hexdigest(), "sha256": hashlib.sha256(blob).hexdigest()}


def tiny_raw(mirrors: list[str], archive: Path, epochs: int = 1) -> dict:
    """cifar10/params.yaml for the tiny tarball: its checksums, its counts, 1 epoch, 10 MC samples."""
    raw = yaml.safe_load((ROOT / "cifar10" / "params.yaml").read_text())
    raw["data"].update(mirrors=mirrors, train_rows=TRAIN_ROWS, test_rows=TEST_ROWS, valid_size=VALID)
    raw["data"]["archive"].update(digests(archive))
    for exp in raw["experiments"].values():
        exp.setdefault("train", {})["epochs"] = epochs
    raw["mc_dropout"]["samples"] = 10
    raw["mlflow"]["log_models"] = False
    return raw


def tiny_params(tmp: Path, mirrors: list[str], archive: Path, **over) -> Cifar10Params:
    raw = tiny_raw(mirrors, archive)
    raw["runtime"]["checkpoint_dir"] = str(tmp / ".checkpoints")
    for k, v in over.items():
        raw["data"][k] = v
    return validate_params(raw, "tiny cifar10 params", Cifar10Params)  # type: ignore[return-value]


@pytest.fixture()
def served(tmp_path):
    """www/good holds the tiny tarball, www/bad a corrupted copy under the same name."""
    www = tmp_path / "www"
    (www / "good").mkdir(parents=True)
    (www / "bad").mkdir()
    raw = write_tarball(www / "good" / NAME)
    blob = (www / "good" / NAME).read_bytes()
    (www / "bad" / NAME).write_bytes(blob[:-16] + b"\0" * 16)
    with http_server(www) as (base, requests):
        yield base, requests, www / "good" / NAME, raw


# ------------------------------------------------------------------------------------------ download

def test_download_verifies_then_split_parses_shapes_labels_and_first_n_valid(served, tmp_path):
    base, requests, archive, raw = served
    p = tiny_params(tmp_path, [f"{base}/good"], archive)
    path = cifar10.run_download(p, tmp_path / "data/raw")
    assert path.read_bytes() == archive.read_bytes() and requests == [f"/good/{NAME}"]
    cifar10.run_download(p, tmp_path / "data/raw")
    assert requests == [f"/good/{NAME}"], "a verified cached copy must not be fetched again"

    card = cifar10.run_split(p, tmp_path / "data/raw", tmp_path / "splits", tmp_path / "card.json", tmp_path / "card.md")
    assert {k: v["rows"] for k, v in card.items()} == {"full_train": TRAIN_ROWS - VALID, "full_valid": VALID, "full_test": TEST_ROWS}
    train, valid, test = (read_split(tmp_path / "splits" / f"full_{s}.parquet") for s in ("train", "valid", "test"))
    assert train.x.shape == (TRAIN_ROWS - VALID, 32, 32, 3) and train.x.dtype == np.uint8
    # valid = the FIRST 30 training images (across batch boundaries), train = the rest, test = test_batch
    np.testing.assert_array_equal(valid.y, raw["train_y"][:VALID])
    np.testing.assert_array_equal(train.y, raw["train_y"][VALID:])
    np.testing.assert_array_equal(test.y, raw["test_y"])
    np.testing.assert_array_equal(train.source_index, np.arange(VALID, TRAIN_ROWS))
    # channel-first rows (1024 R, 1024 G, 1024 B) become 32x32x3 images, as keras.datasets.cifar10 gives them
    np.testing.assert_array_equal(valid.x, raw["train_x"][:VALID].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert valid.x[3, 5, 7, 2] == raw["train_x"][3, 2 * 1024 + 5 * 32 + 7]
    meta = read_meta(tmp_path / "splits" / "full_test.parquet")
    assert meta["class_names"] == CIFAR10_CLASSES and meta["image_shape"] == [32, 32, 3]
    assert meta["source_md5"] == {NAME: digests(archive)["md5"]}
    assert "CIFAR-10" in (tmp_path / "card.md").read_text()


def test_checksum_mismatch_moves_to_the_next_mirror(served, tmp_path):
    base, requests, archive, _ = served
    p = tiny_params(tmp_path, [f"{base}/bad", f"{base}/good"], archive)
    assert cifar10.run_download(p, tmp_path / "raw").read_bytes() == archive.read_bytes()
    assert requests == [f"/bad/{NAME}", f"/good/{NAME}"]
    assert sorted(x.name for x in (tmp_path / "raw").iterdir()) == [NAME]


def test_checksum_mismatch_alone_is_an_error(served, tmp_path):
    base, _, archive, _ = served
    p = tiny_params(tmp_path, [f"{base}/bad"], archive)
    with pytest.raises(DownloadError, match="(?i)sha256") as info:
        cifar10.run_download(p, tmp_path / "raw")
    assert f"{base}/bad" in str(info.value) and "CIFAR-10 needs a network" in str(info.value)
    assert not (tmp_path / "raw" / NAME).exists()


def test_the_authors_md5_is_checked_too(served, tmp_path):
    base, _, archive, _ = served
    raw = tiny_raw([f"{base}/good"], archive)
    raw["data"]["archive"]["md5"] = "0" * 32  # right SHA-256, wrong MD5
    p = validate_params(raw, "t", Cifar10Params)
    with pytest.raises(DownloadError, match="expected md5 0{32}"):
        cifar10.run_download(p, tmp_path / "raw")  # type: ignore[arg-type]


def test_without_network_the_download_fails_fast_and_says_why(tmp_path):
    archive = tmp_path / NAME
    write_tarball(archive)
    mirrors = [str(tmp_path / "downloads"), "http://127.0.0.1:9/kriz"]  # no local copy; a closed port
    p = tiny_params(tmp_path, mirrors, archive)
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as info:
        cifar10.run_download(p, tmp_path / "raw")
    assert time.monotonic() - t0 < 30
    msg = str(info.value)
    assert all(m in msg for m in mirrors) and "CIFAR-10 needs a network" in msg and "data.mirrors" in msg


# ------------------------------------------------------------------------------------------ safe, strict reading

def _dotdot(tar):
    add_member(tar, "../evil", b"owned")


def _absolute(tar):
    add_member(tar, "/tmp/evil", b"owned")


def _symlink_out(tar):
    add_member(tar, "cifar-10-batches-py/link", type=tarfile.SYMTYPE, linkname="../../etc/passwd")


def _hardlink_out(tar):
    add_member(tar, "cifar-10-batches-py/hard", type=tarfile.LNKTYPE, linkname="../outside")


@pytest.mark.parametrize("extra, why", [(_dotdot, "escapes"), (_absolute, "absolute"),
                                        (_symlink_out, "link pointing outside"), (_hardlink_out, "link pointing outside")])
def test_an_archive_with_an_escaping_member_is_refused(tmp_path, extra, why):
    archive = tmp_path / "raw" / NAME
    archive.parent.mkdir()
    write_tarball(archive, extra=extra)
    with pytest.raises(ArchiveError, match=why):
        read_archive(archive)
    p = tiny_params(tmp_path, [str(archive.parent)], archive)
    with pytest.raises(ArchiveError, match="refusing an archive"):
        cifar10.run_split(p, archive.parent, tmp_path / "splits", tmp_path / "c.json", tmp_path / "c.md")
    assert not (tmp_path / "splits").exists() and not (tmp_path / "evil").exists()


def test_a_link_that_stays_inside_is_accepted(tmp_path):
    archive = tmp_path / NAME
    write_tarball(archive, extra=lambda tar: add_member(tar, "cifar-10-batches-py/alias", type=tarfile.SYMTYPE, linkname="test_batch"))
    assert read_archive(archive).test_x.shape == (TEST_ROWS, 32, 32, 3)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("obj, match", [
    ({b"labels": [1]}, "no b'data'"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8 of shape"),
    ({b"data": np.zeros((2, 784), np.uint8), b"labels": [0, 1]}, "uint8 of shape"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels outside 0..9"),
])
def test_batches_are_parsed_strictly(obj, match):
    with pytest.raises(ArchiveError, match=match):
        parse_batch(obj, "data_batch_1")


def test_only_batch_content_can_be_unpickled(tmp_path):
    archive = tmp_path / NAME
    write_tarball(archive, extra=lambda tar: add_member(tar, "cifar-10-batches-py/test_batch", pickle.dumps({b"x": Evil()})))
    with pytest.raises(ArchiveError, match="refusing to unpickle builtins.print"):
        read_archive(archive)


def test_counts_are_checked(tmp_path):
    archive = tmp_path / "raw" / NAME
    archive.parent.mkdir()
    write_tarball(archive)
    p = tiny_params(tmp_path, [str(archive.parent)], archive, train_rows=50_000)
    with pytest.raises(ArchiveError, match="100 training images .* expected 50000"):
        cifar10.run_split(p, archive.parent, tmp_path / "splits", tmp_path / "c.json", tmp_path / "c.md")


# ------------------------------------------------------------------------------------------ the pipeline

@pytest.mark.slow
def test_the_whole_cifar10_pipeline_runs_on_the_tiny_tarball(served, tmp_path, monkeypatch):
    """Every stage of cifar10/dvc.yaml, in order, through the same step functions `python -m components` calls."""
    from components import experiment, mc_dropout, registry, standardize

    base, _, archive, raw = served
    monkeypatch.chdir(tmp_path)  # stage paths are relative to the pipeline's folder
    p = tiny_params(tmp_path, [f"{base}/good"], archive)
    steps = {s.name: s for s in registry.PIPELINES["cifar10"].steps}

    def paths(step: str, item: str | None = None) -> dict[str, Path]:
        return {k: Path(v) for k, v in steps[step].bind(item).items()}

    cifar10.run_download(p, **paths("cifar10_download"))
    cifar10.run_split(p, **paths("cifar10_split"))
    standardize.run(params=p, **paths("cifar10_standardize"))
    for name in p.experiments:
        experiment.run(p, name, **paths("cifar10_experiment", name))
    mc_dropout.run(p, **paths("cifar10_mc_dropout"))
    rows = cifar10.run_summary(p, **paths("cifar10_summary"))

    scaler = np.load("data/scaler.npz")
    train = raw["train_x"][VALID:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).reshape(len(raw["train_x"]) - VALID, -1)
    np.testing.assert_allclose(scaler["mean"], train.mean(0) / 255, rtol=1e-5)  # fitted on train only
    for name, exp in p.experiments.items():
        m = json.loads(Path(f"metrics/experiments/{name}.json").read_text())
        assert m["epochs"] == 1 and m["best_epoch"] == 1 and m["seconds_per_epoch"] > 0
        assert 0 <= m["valid_accuracy"] <= 1 and 0 <= m["test_accuracy"] <= 1
        assert m["batch_size"] == exp.train.batch_size
    assert "one_cycle_max_lr" in json.loads(Path("metrics/experiments/one_cycle.json").read_text())
    import keras

    model = keras.models.load_model("models/experiments/batch_norm.keras")
    assert model.input_shape == (None, 3072)
    from .conftest import assert_loads_alone

    assert_loads_alone(sorted(Path("models/experiments").resolve().glob("*.keras")), raw["test_x"], tmp_path / "iso")
    assert sum(isinstance(layer, keras.layers.Dense) for layer in model.layers) == 21
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers) == 20
    mc = json.loads(Path("metrics/mc_dropout.json").read_text())
    assert list(mc) == ["alpha_dropout"] and mc["alpha_dropout"]["samples"] == 10
    assert [r["variant"] for r in rows] == list(p.experiments)
    top = json.loads(Path("metrics/summary.json").read_text())
    summary = top["variants"]
    assert summary[4]["mc_accuracy"] == mc["alpha_dropout"]["mc_accuracy"]
    best = max(summary, key=lambda r: r["valid_accuracy"])  # the scalars `dvc metrics show` lists
    assert (top["best"], top["best_test"], top["mc_dropout"]) == (best["variant"], best["test_accuracy"],
                                                                  mc["alpha_dropout"]["mc_accuracy"])
    md = Path("reports/summary.md").read_text()
    assert "| variant | lr | batch | valid acc | test acc |" in md and all(f"| {n} |" in md for n in p.experiments)


@pytest.mark.slow
def test_cifar10_is_a_dvc_project_of_its_own(tmp_path):
    """The chapter's `dvc status` never lists the CIFAR-10 stages; `cd cifar10 && dvc repro` runs them."""
    repo = copy_repo(tmp_path / "repo")
    archive = repo / "cifar10" / "downloads" / NAME
    archive.parent.mkdir()
    write_tarball(archive)
    raw = tiny_raw(["downloads", "http://127.0.0.1:9/kriz"], archive)
    raw["mlflow"]["enabled"] = False
    (repo / "cifar10" / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    root_status = run(["dvc", "status"], cwd=repo).stdout
    assert "cifar10" not in root_status and "download" in root_status
    out = run(["dvc", "repro", "cifar10_standardize"], cwd=repo / "cifar10").stdout
    for stage in ("cifar10_download", "cifar10_split", "cifar10_standardize"):
        assert f"Running stage '{stage}'" in out
    assert "Running stage" not in run(["dvc", "repro", "cifar10_standardize"], cwd=repo / "cifar10").stdout
    assert "up to date" in run(["dvc", "status", "cifar10_standardize"], cwd=repo / "cifar10").stdout
    assert json.loads((repo / "cifar10/metrics/dataset_card.json").read_text())["full_valid"]["rows"] == VALID
    assert "cifar10" not in run(["dvc", "status"], cwd=repo).stdout
