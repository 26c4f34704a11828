"""The training loop every experiment uses: Keras ``fit`` with the book's batch size and epochs, made fast,
deterministic, resumable and safe.

* **Fast**: the data lives in memory as uint8, each epoch's rows gathered once in-graph and sliced into batches;
  ``steps_per_execution`` fuses many train steps into one graph call; the local profile's threads (one per op:
  tiny matmuls lose more to thread hand-offs than they gain on 2 cores). None of this changes the batch size,
  the number of steps or the epochs: every update is still one batch of ``batch_size`` images.
* **Deterministic**: seeds from params, TensorFlow's deterministic ops, and a shuffle order that is a
  pure function of (seed, epoch), so the same params and data give bit-identical weights.
* **Resumable**: after each epoch the full training state (model and optimizer variables, RNG states,
  history, the counters of early stopping and ReduceLROnPlateau) is saved atomically under
  ``runtime.checkpoint_dir``, keyed by a hash of the spec, seed and data; a rerun after a crash or
  ``kill -9`` continues from the last finished epoch and ends with the same weights as an uninterrupted run.
* **Safe**: a NaN/inf loss stops training with ``TrainingDiverged``; no model file is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import Experiment, OneCycleSchedule, PerformanceSchedule, Runtime
from .dataset import read_split
from .io import atomic_path, write_json

log = logging.getLogger("components.train")

_CONFIGURED = False
FAULT_ENV = "CH11_FAULT_KILL_AFTER_EPOCH"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def container_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPUs this container may use (its cgroup's CPU quota, rounded up), or None when it has no limit."""
    try:
        if (cgroup / "cpu.max").is_file():  # cgroup v2: "<quota> <period>" or "max <period>"
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        else:  # cgroup v1
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def configure(runtime: Runtime) -> None:
    """Threads, precision and determinism of this process's profile (``runtime.tuning``: ``local`` on this kind of
    box, ``cluster`` in a Kubeflow pod); must run before TensorFlow executes any op (once per process)."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tuning = runtime.tuning
    cpus = container_cpus()  # a pod's CPU limit: TensorFlow would otherwise size its pools by the node's cores
    intra, inter = tuning.intra_op_threads or cpus, tuning.inter_op_threads or cpus
    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # TensorFlow already initialized: its thread pools are fixed now
        if tuning.intra_op_threads and tf.config.threading.get_intra_op_parallelism_threads() != tuning.intra_op_threads:
            log.warning("TensorFlow was initialized before the runtime settings could apply: intra-op threads = %s, "
                        "not %s; numbers may differ from a fresh run", tf.config.threading.get_intra_op_parallelism_threads(),
                        tuning.intra_op_threads)
    gpus = tf.config.list_physical_devices("GPU")
    # A Kubeflow GPU task (pipeline.py sets CH11_REQUIRE_GPU) must not silently train on CPU.
    if os.environ.get("CH11_REQUIRE_GPU") == "1" and not gpus:
        raise RuntimeError(
            "this Kubeflow task requested a GPU but TensorFlow sees none (the request was dropped, the node has no "
            "driver, or the image is the CPU build). Check the task's node and image (kubeflow.gpu_image), or set "
            "kubeflow.gpu.required: false in params.yaml to let it train on CPU.")
    if tuning.mixed_precision and gpus:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
    # On a CPU with one intra-op thread every op is already deterministic (no parallel reductions), and
    # tests/test_training.py proves bit-identical weights; TensorFlow's op-determinism switch would also
    # turn XLA off in Keras. Elsewhere (GPU, several threads per op) switch it on.
    if runtime.deterministic and (tuning.intra_op_threads != 1 or gpus):
        tf.config.experimental.enable_op_determinism()
    _CONFIGURED = True


def seed_everything(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)  # Python, NumPy, TensorFlow / Keras global generator


# ------------------------------------------------------------------------------------------ data

@dataclass
class TaskData:
    x: dict[str, np.ndarray]  # split -> (n, pixels) uint8: 784 (Fashion-MNIST), 3072 (CIFAR-10)
    y: dict[str, np.ndarray]  # split -> (n,) int32 (float32 for binary task b)
    fingerprint: str  # sha256 of the arrays: keys checkpoints to the exact data


def load_task(splits_dir: Path, task: str) -> TaskData:
    x, y = {}, {}
    h = hashlib.sha256()
    for split in ("train", "valid", "test"):
        s = read_split(Path(splits_dir) / f"{task}_{split}.parquet")
        x[split] = np.ascontiguousarray(s.x.reshape(len(s), -1))
        y[split] = s.y.astype(np.float32 if task == "b" else np.int32)
        h.update(x[split].tobytes())
        h.update(y[split].tobytes())
    return TaskData(x, y, h.hexdigest())


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def train_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, first_epoch: int, epochs: int):
    """Batches of ``batch_size`` for epochs ``first_epoch..epochs-1``, in an order fixed by (seed, epoch).

    The images stay in memory as one uint8 tensor. At the start of each epoch its rows are gathered once, in
    that epoch's order (one in-graph gather: 43 MB of uint8 for Fashion-MNIST, no float copy), and the batches are
    consecutive slices of it; the last batch of an epoch is the remainder. The images stay uint8 in the batches:
    Keras converts a model's input to its ``Input``'s float32 inside the training step (exact for uint8).

    No work per batch in tf.data: a ``map`` that gathered each batch cost a function call per batch (~0.1 ms, a
    sixth of the small MLP's step: 1.22× and 1.26× as fast without it, 1.06–1.10× for the 100-layer net; the same
    batches, the same weights), and batching 32 scalar indices element by element cost ~90 µs more again.
    """
    import tensorflow as tf

    n = len(x)
    full = n // batch_size
    orders = np.array([epoch_permutation(seed, e, n) for e in range(first_epoch, epochs)], np.int32).reshape(-1, n)
    xt, yt = tf.constant(x), tf.constant(y)

    def epoch(order):
        xe, ye = tf.gather(xt, order), tf.gather(yt, order)
        cut = full * batch_size
        ds = tf.data.Dataset.from_tensor_slices((tf.reshape(xe[:cut], [full, batch_size, *x.shape[1:]]),
                                                 tf.reshape(ye[:cut], [full, batch_size, *y.shape[1:]])))
        if n > cut:
            ds = ds.concatenate(tf.data.Dataset.from_tensors((xe[cut:], ye[cut:])))
        return ds

    return tf.data.Dataset.from_tensor_slices(orders).flat_map(epoch)


def eval_dataset(x: np.ndarray, y: np.ndarray, batch_size: int):
    import tensorflow as tf

    xt, yt = tf.constant(x), tf.constant(y)
    return tf.data.Dataset.range(len(x)).batch(batch_size).map(
        lambda i: (tf.cast(tf.gather(xt, i), tf.float32), tf.gather(yt, i)))


# ------------------------------------------------------------------------------------------ state

def state_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# Keras callbacks whose counters decide what later epochs do (stop; lower the learning rate): their state is
# saved with every epoch's checkpoint and put back on resume, so a resumed run stops, or lowers the rate, at the
# same epoch as an uninterrupted one. EarlyStopping's best weights (restore_best_weights) are saved too.
STATEFUL_CALLBACKS = {
    "EarlyStopping": ("wait", "stopped_epoch", "best", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
}


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else (float(np.asarray(v)) if hasattr(v, "shape") else v)


@dataclass
class Restored:
    epoch: int
    history: list[dict]
    callbacks: list[dict | None]  # per callback (same order as saved): its counters, or None
    arrays: dict[str, np.ndarray]  # callbacks' weight lists, "cb<i>_w<j>"
    stopped: bool  # training had been stopped (early stopping) when this state was saved

    def apply(self, callbacks: list) -> None:
        """Put the saved counters (and best weights) back into ``callbacks`` (call after their on_train_begin)."""
        for i, (cb, st) in enumerate(zip(callbacks, self.callbacks)):
            if st is None or type(cb).__name__ not in STATEFUL_CALLBACKS:
                continue
            for attr in STATEFUL_CALLBACKS[type(cb).__name__]:
                setattr(cb, attr, st.get(attr))
            if st.get("best_weights") is not None:
                cb.best_weights = [self.arrays[f"cb{i}_w{j}"] for j in range(st["best_weights"])]


class Checkpoint:
    """The whole training state after an epoch: every model and optimizer variable (weights, BN
    statistics, RNG seeds, slots, iteration count, learning rate), the history so far and the counters of
    the stateful callbacks. Written atomically."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.meta = self.dir / "state.json"

    def _variables(self, model) -> list:
        return list(model.variables) + list(model.optimizer.variables)

    def save(self, model, epoch: int, history: list[dict], callbacks: list = (), stopped: bool = False) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        arrays = {f"v{i}": np.asarray(v) for i, v in enumerate(self._variables(model))}
        states: list[dict | None] = []
        for i, cb in enumerate(callbacks):
            attrs = STATEFUL_CALLBACKS.get(type(cb).__name__)
            if attrs is None:
                states.append(None)
                continue
            st = {a: _plain(getattr(cb, a, None)) for a in attrs}
            best = getattr(cb, "best_weights", None)
            st["best_weights"] = None if best is None else len(best)
            arrays.update({f"cb{i}_w{j}": np.asarray(w) for j, w in enumerate(best or [])})
            states.append(st)
        name = f"epoch_{epoch:04d}.npz"
        with atomic_path(self.dir / name) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        with atomic_path(self.meta) as tmp:
            tmp.write_text(json.dumps({"epoch": epoch, "file": name, "history": history, "callbacks": states, "stopped": stopped}))
        for old in self.dir.glob("epoch_*.npz"):
            if old.name != name:
                old.unlink()

    def load(self, model) -> Restored | None:
        """Put the saved variables back into ``model``; the rest of the state is returned."""
        if not self.meta.is_file():
            return None
        meta = json.loads(self.meta.read_text())
        with np.load(self.dir / meta["file"]) as z:
            n = sum(1 for k in z.files if k.startswith("v"))
            arrays = [z[f"v{i}"] for i in range(n)]
            extra = {k: z[k] for k in z.files if k.startswith("cb")}
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        variables = self._variables(model)
        if len(variables) != len(arrays):
            log.warning("checkpoint in %s does not fit this model; starting from scratch", self.dir)
            return None
        for v, a in zip(variables, arrays):
            v.assign(a)
        return Restored(int(meta["epoch"]), list(meta["history"]), list(meta.get("callbacks") or []), extra,
                        bool(meta.get("stopped", False)))

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _make_callbacks(history: list[dict], epochs: int, label: str):
    import keras

    class Progress(keras.callbacks.Callback):
        """Per-epoch record (metrics, lr, seconds), NaN guard and a readable log line. Runs first."""

        diverged: str | None = None

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                self.diverged = f"loss became {float(loss)} in epoch {len(history) + 1}"
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            if self.diverged or not all(math.isfinite(v) for k, v in logs.items() if "loss" in k):
                self.diverged = self.diverged or f"loss became non-finite in epoch {epoch + 1}: {logs}"
                self.model.stop_training = True
                return
            opt = self.model.optimizer
            lr = float(np.asarray(opt.learning_rate if not callable(opt._learning_rate) else opt._learning_rate(opt.iterations)))
            rec = {"epoch": epoch + 1, **logs, "learning_rate": lr, "epoch_seconds": time.perf_counter() - self.t0}
            history.append(rec)
            shown = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if k in ("loss", "accuracy", "val_loss", "val_accuracy"))
            log.info("%s epoch %d/%d %s (%.1fs)", label, epoch + 1, epochs, shown, rec["epoch_seconds"])

    return Progress()


def _make_saver(checkpoint: Checkpoint, history: list[dict], progress, callbacks: list, restored: Restored | None):
    """Runs last: puts a resumed run's callback counters back after the callbacks reset them in
    on_train_begin, and saves the checkpoint once every callback has seen the epoch (a lowered learning
    rate, an early stop, the diagnostics of the epoch are all in the saved state)."""
    import keras

    class Saver(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if restored is not None:
                restored.apply(callbacks)

        def on_epoch_end(self, epoch, logs=None):
            if progress.diverged:
                return
            checkpoint.save(self.model, epoch + 1, history, callbacks, stopped=bool(self.model.stop_training))
            if os.environ.get(FAULT_ENV) == str(epoch + 1):  # fault injection: a real kill -9, for the resume tests
                os.kill(os.getpid(), signal.SIGKILL)

    return Saver()


@dataclass
class FitResult:
    history: list[dict]
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def fused_steps(cap: int, steps_per_epoch: int) -> int:
    """Largest divisor of ``steps_per_epoch`` not above ``cap``: Keras runs whole executions, so a
    non-divisor would stretch an epoch past its real number of batches."""
    return max(d for d in range(1, min(cap, steps_per_epoch) + 1) if steps_per_epoch % d == 0)


def compile_options(runtime: Runtime, steps_per_epoch: int) -> dict[str, Any]:
    """``model.compile``'s speed arguments under this process's runtime profile (never the hyper-parameters):
    ``steps_per_execution`` train steps per graph call. XLA stays Keras' default ("auto": off on a CPU)."""
    return {"steps_per_execution": fused_steps(runtime.tuning.steps_per_execution, steps_per_epoch)}


def fit(
    model,
    exp: Experiment,
    data: TaskData,
    runtime: Runtime,
    seed: int,
    epochs: int,
    checkpoint: Checkpoint | None = None,
    callbacks: list | None = None,
    label: str = "",
) -> FitResult:
    """``model.fit`` over ``epochs`` epochs (already compiled), resuming from ``checkpoint`` if it holds a state."""
    import keras

    bs = exp.train.batch_size
    steps = math.ceil(len(data.x["train"]) / bs)
    history: list[dict] = []
    start = 0
    restored = checkpoint.load(model) if checkpoint is not None else None
    if restored:
        start, history = restored.epoch, restored.history
        log.info("%s: resuming after epoch %d/%d from %s", label, start, epochs, checkpoint.dir)
    progress = _make_callbacks(history, epochs, label)
    cbs: list = [progress]
    if isinstance(exp.schedule, PerformanceSchedule):
        cbs.append(keras.callbacks.ReduceLROnPlateau(monitor=exp.schedule.monitor, factor=exp.schedule.factor, patience=exp.schedule.patience))
    if exp.train.early_stopping:
        es = exp.train.early_stopping
        cbs.append(keras.callbacks.EarlyStopping(monitor=es.monitor, patience=es.patience, restore_best_weights=es.restore_best_weights))
    cbs += callbacks or []
    if checkpoint is not None:
        cbs.append(_make_saver(checkpoint, history, progress, cbs, restored))
    if start < epochs and not (restored and restored.stopped):
        done = int(model.optimizer.iterations)
        model.fit(
            train_dataset(data.x["train"], data.y["train"], bs, seed, start, epochs),
            validation_data=eval_dataset(data.x["valid"], data.y["valid"], runtime.eval_batch_size),
            epochs=epochs,
            initial_epoch=start,
            steps_per_epoch=steps,
            callbacks=cbs,
            shuffle=False,  # the dataset is already in its (seed, epoch) order
            verbose=0,
        )
        if not progress.diverged and not model.stop_training:
            ran = int(model.optimizer.iterations) - done
            if ran != steps * (epochs - start):
                raise RuntimeError(f"{label}: ran {ran} train steps, expected {steps * (epochs - start)}")
    elif restored is not None:
        # the interrupted run had finished training (every epoch, or an early stop) but was killed before its
        # outputs were written: begin and end it as fit does, with no epoch in between (the saver puts the
        # callbacks' state back; EarlyStopping then restores its best weights; diagnostics reload their records)
        log.info("%s: training had already ended after epoch %d; no more epochs", label, start)
        for cb in cbs:
            cb.set_model(model)
            cb.set_params({"epochs": epochs, "steps": steps, "verbose": 0})
        for hook in ("on_train_begin", "on_train_end"):
            for cb in cbs:
                getattr(cb, hook)()
    if progress.diverged:
        if checkpoint is not None:
            checkpoint.clear()
        raise TrainingDiverged(
            f"{label}: {progress.diverged}. Training stopped and no model was written. "
            "Lower the optimizer's learning_rate, add clipnorm/clipvalue, or check the inputs in params.yaml."
        )
    return FitResult(history, resumed_from=start)


def evaluate(model, data: TaskData, batch_size: int) -> dict[str, float]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for split in ("train", "valid", "test"):
        res = model.evaluate(eval_dataset(data.x[split], data.y[split], batch_size), verbose=0, return_dict=True)
        out[f"{split}_loss"] = float(res["loss"])
        out[f"{split}_accuracy"] = float(res["accuracy"])
    log.debug("evaluated train/valid/test in %.1fs", time.perf_counter() - t0)
    return out


def timing(history: list[dict]) -> dict[str, float]:
    secs = [h["epoch_seconds"] for h in history]
    if not secs:
        return {}
    steady = secs[1:] or secs
    return {"seconds_per_epoch": float(np.median(steady)), "first_epoch_seconds": float(secs[0]), "train_seconds": float(sum(secs))}


def lr_range_test(
    build: Callable[[], Any], exp: Experiment, data: TaskData, runtime: Runtime, seed: int, loss: str
) -> dict[str, Any]:
    """The book's LR-range test: 1 epoch (batch 128), lr growing exponentially 1e-5 → 10; returns the
    per-batch loss curve and max_lr = lr at the lowest smoothed loss / ``divide_min_by``."""
    import keras

    assert isinstance(exp.schedule, OneCycleSchedule)
    rt = exp.schedule.range_test
    bs = rt.batch_size
    steps = math.ceil(len(data.x["train"]) / bs) * rt.epochs
    model = build()
    lr = keras.optimizers.schedules.ExponentialDecay(rt.min_lr, decay_steps=max(steps - 1, 1), decay_rate=rt.max_lr / rt.min_lr)
    model.compile(loss=loss, optimizer=keras.optimizers.SGD(lr),
                  metrics=["accuracy"], steps_per_execution=1)
    lrs: list[float] = []
    losses: list[float] = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            # Keras reports the running mean of the epoch; recover this batch's own loss from it
            mean = float(logs["loss"])
            k = batch + 1
            prev = self.prev if batch else 0.0
            losses.append(k * mean - (k - 1) * prev)
            self.prev = mean
            lrs.append(float(rt.min_lr * (rt.max_lr / rt.min_lr) ** (len(lrs) / max(steps - 1, 1))))
            if not math.isfinite(mean) or (len(losses) > 10 and losses[-1] > 4 * min(losses)):
                self.model.stop_training = True

    model.fit(train_dataset(data.x["train"], data.y["train"], bs, seed, 0, rt.epochs), epochs=rt.epochs,
              steps_per_epoch=steps // rt.epochs, callbacks=[Record()], shuffle=False, verbose=0)
    smooth, ema = [], None
    for v in losses:
        ema = v if ema is None else 0.98 * ema + 0.02 * v
        smooth.append(ema)
    finite = [i for i, v in enumerate(smooth) if math.isfinite(v)]
    best = min(finite, key=lambda i: smooth[i])
    max_lr = lrs[best] / rt.divide_min_by
    log.info("LR-range test: lowest smoothed loss %.4f at lr %.3g -> max_lr %.3g", smooth[best], lrs[best], max_lr)
    return {"lr": lrs, "loss": losses, "smoothed_loss": smooth, "lr_at_min_loss": lrs[best], "max_lr": max_lr}


def plain_copy(model):
    """The trained network alone: the same layers and weights, not compiled, so that the saved file holds no
    optimizer, learning-rate schedule or training setting (none of which ``load_model`` should need)."""
    twin = type(model).from_config(model.get_config())  # (keras.models.clone_model would copy the compile config)
    twin.set_weights(model.get_weights())
    assert not twin.compiled
    return twin


def _reproducible_zip(src: Path, dst: Path) -> None:
    """The ``.keras`` zip without what changes from one save to the next (each member's time stamp, the save date
    in metadata.json), so that the same weights give the same bytes: no new md5 in dvc.lock, no rerun downstream."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            blob = zin.read(info)
            if info.filename == "metadata.json":
                meta = json.loads(blob)
                meta.pop("date_saved", None)
                blob = json.dumps(meta, sort_keys=True).encode()
            zout.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), blob,
                          compress_type=info.compress_type)


def save_model(model, path: Path) -> None:
    """Save the trained network (architecture and weights, without the optimizer: see ``plain_copy``) as a
    ``.keras`` file that ``keras.models.load_model`` opens with Keras alone, byte for byte the same for the same
    weights; written to temporary files beside ``path``, then renamed (Keras needs the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.parent / f".{path.stem}.{os.getpid()}.raw.tmp.keras"
    tmp = path.parent / f".{path.stem}.{os.getpid()}.tmp.keras"
    try:
        plain_copy(model).save(raw)
        _reproducible_zip(raw, tmp)
        os.replace(tmp, path)
    finally:
        raw.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def write_history_csv(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for h in history:
        keys += [k for k in h if k not in keys]
    lines = [",".join(keys)] + [",".join(f"{h.get(k, '')}" for k in keys) for h in history]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def write_metrics(path: Path, metrics: dict) -> None:
    write_json(path, metrics)
