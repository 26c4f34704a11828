"""``python tools/repro.py [--jobs N] [PIPELINE]``: ``dvc repro`` with independent stages running at once (a local convenience:
nothing on the step path or in a Kubeflow task uses it).

DVC runs the stages of one ``dvc repro`` one after another. Its documented way to use more cores is to run
``dvc repro`` on independent arms of the DAG at the same time
(https://dvc.org/doc/command-reference/repro#parallel-stage-execution): DVC releases the repo lock while a
stage's command runs, holds read locks on its deps and write locks on its outs, and each stage's entry in
dvc.lock is merged in under the lock. This module does that for the whole DAG:

1. the DAG comes from ``dvc dag --dot`` and what is out of date from ``dvc status --json`` (plus everything
   downstream of it), so DVC stays the only judge of what to run;
2. up to ``--jobs`` stages run at once, each as ``dvc --wait-for-lock repro --single-item <stage>`` started
   only when every stage upstream of it has finished, the one with the longest path to the end of the DAG
   first (by the durations of the last run; on a fresh clone, by the training seconds in the committed
   metrics), so that a long stage and what waits on it do not start last;
3. a final plain ``dvc repro`` then has to find nothing to do: the proof that the parallel run left exactly
   what the sequential one would (it is also what runs the rest if this module is interrupted).

Every stage trains on one intra-op thread (``runtime.intra_op_threads`` in params.yaml) and is
deterministic, so the numbers are the same as with a plain ``dvc repro``; only the wall time changes.
Each stage's output goes to ``.dvc/tmp/repro-logs/<stage>.log``; a failed stage prints its log's tail,
the stages already running finish, no new one starts, and the exit code is non-zero.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

LOG_DIR = Path(".dvc/tmp/repro-logs")
DURATIONS = Path(".dvc/tmp/repro-durations.json")  # seconds per stage of the last run: longest goes first


def _dvc() -> str:
    exe = Path(sys.executable).with_name("dvc")
    return str(exe) if exe.exists() else "dvc"


def dag(target: str = "dvc.yaml") -> tuple[list[str], dict[str, set[str]]]:
    """Stages of ``target`` and upstream (in dvc.yaml order) and, for each, the stages it depends on, as
    ``dvc dag --dot`` prints them."""
    dot = subprocess.run([_dvc(), "dag", "--dot", target], check=True, capture_output=True, text=True).stdout
    nodes: list[str] = []
    ups: dict[str, set[str]] = {}
    for line in dot.splitlines():
        if m := re.fullmatch(r'\s*"(.+?)"\s*->\s*"(.+?)";?\s*', line):
            ups.setdefault(m[2], set()).add(m[1])
        elif m := re.fullmatch(r'\s*"(.+?)";?\s*', line):
            nodes.append(m[1])
    for n in nodes:
        ups.setdefault(n, set())
    return nodes, ups


def downstream(nodes: list[str], ups: dict[str, set[str]]) -> dict[str, set[str]]:
    """The stages that depend directly on each stage (``ups`` turned around)."""
    downs: dict[str, set[str]] = {n: set() for n in nodes}
    for n, us in ups.items():
        for u in us:
            downs.setdefault(u, set()).add(n)
    return downs


def out_of_date(nodes: list[str], ups: dict[str, set[str]], target: str = "dvc.yaml") -> list[str]:
    """What ``dvc repro`` would consider: the changed stages and everything downstream of them."""
    res = subprocess.run([_dvc(), "status", "--json", target], check=True, capture_output=True, text=True)
    changed = {name.removeprefix("dvc.yaml:") for name in json.loads(res.stdout or "{}")}  # as `dvc dag` names them
    downs = downstream(nodes, ups)
    todo, queue = set(), deque(n for n in nodes if n in changed)
    while queue:
        n = queue.popleft()
        if n not in todo:
            todo.add(n)
            queue.extend(downs.get(n, ()))
    return [n for n in nodes if n in todo]


def _train_seconds(obj) -> float:
    if isinstance(obj, dict):
        return sum(float(v) if k == "train_seconds" and isinstance(v, (int, float)) else _train_seconds(v)
                   for k, v in obj.items())
    if isinstance(obj, list):
        return sum(_train_seconds(v) for v in obj)
    return 0.0


def estimated_durations(nodes: list[str], overhead: float = 10.0) -> dict[str, float]:
    """Seconds per stage when no run has been timed here yet: the ``train_seconds`` of the stage's metrics file
    as committed (``metrics/**/<item>.json``) plus a fixed overhead; stages without one get the overhead."""
    est: dict[str, float] = {}
    for n in nodes:
        item = re.sub(r"-\d+$", "", n.split("@")[-1].split(":")[-1])  # a matrix stage: <experiment>-<seed>
        secs = 0.0
        for f in Path("metrics").glob(f"**/{item}.json"):  # the main job's run and any claims run's: the longest
            with contextlib.suppress(OSError, ValueError):
                secs = max(secs, _train_seconds(json.loads(f.read_text())))
        est[n] = overhead + secs
    return est


def critical_path(nodes: list[str], ups: dict[str, set[str]], secs: dict[str, float]) -> dict[str, float]:
    """For each stage, its seconds plus the longest chain of seconds downstream of it (list scheduling's rank)."""
    downs = downstream(nodes, ups)
    rank: dict[str, float] = {}

    def visit(n: str) -> float:
        if n not in rank:
            rank[n] = secs.get(n, 0.0) + max((visit(d) for d in downs.get(n, ())), default=0.0)
        return rank[n]

    for n in nodes:
        visit(n)
    return rank


def _log_path(stage: str) -> Path:
    return LOG_DIR / f"{stage.replace('/', '_')}.log"


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def prepare_tracking_store() -> None:
    """Create the local sqlite MLflow store before stages start at once (two first writers would race on its
    schema). A server (MLFLOW_TRACKING_URI=http...) needs nothing."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package (run as a script)
    from components.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        subprocess.run([sys.executable, "-c", "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()",
                        uri], check=True, capture_output=True)


def params_guards() -> set[str]:
    """The params guards of components/registry.py: DVC-only first stages whose output never changes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package (run as a script)
    from components import registry

    return {p.guard.name for p in registry.PIPELINES.values() if p.guard}


def run(jobs: int, target: str = "dvc.yaml") -> int:
    nodes, ups = dag(target)
    todo = out_of_date(nodes, ups, target)
    first = [n for n in todo if n in params_guards() and not ups[n]]
    if first:  # a params edit makes the guard stale and so, on paper, every stage below it: run it alone, then ask
        for n in first:  # DVC again (its output never changes, so only what the edit really touches is left)
            print(f"[repro] params first: dvc repro --single-item {n}", flush=True)
            rc = subprocess.call([_dvc(), "--wait-for-lock", "repro", "--single-item", n])
            if rc:
                print(f"[repro] {n} rejected the params: nothing else ran; fix params.yaml and run the same command "
                      "again", file=sys.stderr, flush=True)
                return rc
        todo = out_of_date(nodes, ups, target)
    if todo and jobs > 1:
        prepare_tracking_store()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    try:
        last = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        last = {}
    rank = critical_path(nodes, ups, {**estimated_durations(nodes), **last})
    order = {n: i for i, n in enumerate(nodes)}
    pending = set(todo)
    done: set[str] = set(nodes) - pending  # up to date: nothing to wait for
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    failed: list[str] = []
    t0 = time.monotonic()
    total, started, finished = len(todo), 0, 0
    print(f"[repro] {total} of {len(nodes)} stages to run, {jobs} at a time (logs: {LOG_DIR}/)", flush=True)

    def start(stage: str) -> None:
        nonlocal started
        started += 1
        log = open(_log_path(stage), "w")
        cmd = [_dvc(), "--wait-for-lock", "repro", "--single-item", stage]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        running[stage] = (proc, time.monotonic(), log)
        print(f"[repro] {started:>3}/{total} start  {stage}", flush=True)

    try:
        while pending or running:
            ready = [n for n in pending if ups[n] <= done] if not failed else []
            ready.sort(key=lambda n: (-rank[n], order[n]))
            while ready and len(running) < jobs:
                n = ready.pop(0)
                pending.discard(n)
                start(n)
            if not running:
                break  # only stages behind a failure are left
            time.sleep(0.2)
            for n, (proc, began, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[n]
                secs = time.monotonic() - began
                finished += 1
                if proc.returncode == 0:
                    done.add(n)
                    last[n] = round(secs, 1)
                    print(f"[repro] {finished:>3}/{total} done   {n}  ({secs:.0f} s)", flush=True)
                else:
                    failed.append(n)
                    print(f"[repro] FAILED {n} (exit {proc.returncode}); last lines of {_log_path(n)}:\n"
                          f"{_tail(_log_path(n))}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        for proc, _, _ in running.values():
            with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                os.killpg(proc.pid, signal.SIGINT)
        for proc, _, _ in running.values():
            proc.wait()
        print("[repro] interrupted; run the same command again to go on where it stopped", file=sys.stderr)
        return 130
    finally:
        tmp = DURATIONS.with_suffix(".tmp")
        tmp.write_text(json.dumps(last, indent=1, sort_keys=True))
        os.replace(tmp, DURATIONS)
    if failed:
        skipped = sorted(pending, key=order.__getitem__)
        print(f"[repro] {len(failed)} stage(s) failed: {', '.join(failed)}"
              + (f"; not run because of it: {', '.join(skipped)}" if skipped else "")
              + ". Fix the cause and run the same command again: finished stages are not rerun.", file=sys.stderr)
        return 1
    print(f"[repro] parallel part done in {time.monotonic() - t0:.0f} s; now a plain `dvc repro`, which must find "
          "nothing to do", flush=True)
    return subprocess.call([_dvc(), "repro", target])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/repro.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-j", "--jobs", type=int, default=0,
                   help="stages at once (default: $CH11_REPRO_JOBS, else one more than the CPUs, at most 5)")
    p.add_argument("pipeline", nargs="?", default="dvc.yaml",
                   help="the dvc.yaml to reproduce, with what it depends on (default: the chapter's; claims/dvc.yaml: "
                        "a claims run)")
    a = p.parse_args(argv)
    # One more stage than cores: every stage has phases that leave its core idle (DVC reading the project,
    # waiting for its lock, hashing outputs; the stage's start and its MLflow logging), which a third stage
    # fills on 2 cores (measured from fresh clones: CPUs 80 % busy with 2 stages, 87 % with 3; the chapter's
    # pipeline 1,212 s -> 981 s, same metrics, bit-identical weights).
    jobs = a.jobs or int(os.environ.get("CH11_REPRO_JOBS", 0)) or min(4, len(os.sched_getaffinity(0))) + 1
    return run(max(1, jobs), a.pipeline)


if __name__ == "__main__":
    sys.exit(main())
