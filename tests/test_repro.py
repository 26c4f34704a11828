"""tools/repro.py: `dvc repro` with independent stages at once, on a real DVC project in a temporary git repo."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from .conftest import ROOT, run

REPRO = ROOT / "tools/repro.py"


def _repro_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("repro", REPRO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# a -> (b, c) -> d: b and c are independent; each stage records when it ran (seconds since the epoch).
STAGE = ("{py} -c \"import sys,time; t=time.time(); time.sleep({secs}); "
         "open('{out}','w').write(open('{dep}').read() + '{name} ' + repr((t, time.time())) + chr(10)) "
         "if '{fail}' != '{name}' else sys.exit(3)\"")


def _project(tmp_path: Path, fail: str = "", sleep_b: float = 2.0) -> Path:
    py = sys.executable
    stages = {}
    for name, dep, secs in (("a", "seed.txt", 0), ("b", "a.txt", sleep_b), ("c", "a.txt", 2.0)):
        stages[name] = {"cmd": STAGE.format(py=py, secs=secs, out=f"{name}.txt", dep=dep, name=name, fail=fail),
                        "deps": [dep], "outs": [f"{name}.txt"]}
    stages["d"] = {"cmd": f"{py} -c \"open('d.txt','w').write(open('b.txt').read() + open('c.txt').read())\"",
                   "deps": ["b.txt", "c.txt"], "outs": ["d.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (tmp_path / "seed.txt").write_text("seed\n")
    run(["git", "init", "-q"], cwd=tmp_path)
    run(["dvc", "init", "-q"], cwd=tmp_path)
    return tmp_path


def _times(path: Path) -> dict[str, tuple[float, float]]:
    out = {}
    for line in path.read_text().splitlines():
        name, _, span = line.partition(" ")
        if span:
            out[name] = tuple(eval(span))  # noqa: S307 - written by the stage above: a tuple of two floats
    return out


def test_independent_stages_overlap_and_dvc_finds_nothing_left(tmp_path):
    repo = _project(tmp_path)
    proc = run([sys.executable, str(REPRO), "--jobs", "2"], cwd=repo)
    t = _times(repo / "d.txt")
    assert set(t) == {"a", "b", "c"}
    assert t["b"][0] >= t["a"][1] and t["c"][0] >= t["a"][1]          # after their dependency
    assert t["b"][0] < t["c"][1] and t["c"][0] < t["b"][1]             # b and c ran at the same time
    assert "4 of 4 stages to run, 2 at a time" in proc.stdout
    assert "Data and pipelines are up to date" in proc.stdout + proc.stderr  # the closing plain `dvc repro`
    assert run(["dvc", "status", "--json"], cwd=repo).stdout.strip() in ("{}", "")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"a", "b", "c", "d"}  # both parallel writers' entries kept in dvc.lock

    again = run([sys.executable, str(REPRO), "--jobs", "2"], cwd=repo)
    assert "0 of 4 stages to run" in again.stdout
    (repo / "seed.txt").write_text("changed\n")  # everything downstream of a changed dep runs again
    third = run([sys.executable, str(REPRO), "--jobs", "2"], cwd=repo)
    assert "4 of 4 stages to run" in third.stdout
    assert (repo / "d.txt").read_text().startswith("changed\n")


def test_a_failed_stage_stops_what_depends_on_it_and_names_it(tmp_path):
    repo = _project(tmp_path, fail="b", sleep_b=0)
    proc = run([sys.executable, str(REPRO), "--jobs", "2"], cwd=repo, check=False)
    assert proc.returncode == 1
    assert "FAILED b" in proc.stderr and "not run because of it: d" in proc.stderr
    assert (repo / "c.txt").is_file() and not (repo / "d.txt").exists()
    status = json.loads(run(["dvc", "status", "--json"], cwd=repo).stdout)
    assert "b" in status and "c" not in status and "a" not in status  # finished stages are kept
    durations = json.loads((repo / ".dvc/tmp/repro-durations.json").read_text())
    assert set(durations) == {"a", "c"}


def test_stage_order_is_longest_path_first(tmp_path, monkeypatch):
    """A short stage with a long stage behind it goes before a longer stage with nothing behind it; on a fresh
    clone the seconds come from the committed metrics (train_seconds, nested ones summed)."""
    repro = _repro_module()

    nodes = ["a", "b", "c", "d"]
    ups = {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"b"}}
    rank = repro.critical_path(nodes, ups, {"a": 1, "b": 5, "c": 10, "d": 20})
    assert rank == {"a": 26, "b": 25, "c": 10, "d": 20}
    assert sorted(["c", "b"], key=lambda n: -rank[n]) == ["b", "c"]

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics/experiments").mkdir(parents=True)
    (tmp_path / "metrics/experiments/slow.json").write_text(json.dumps({"train_seconds": 80.0, "epochs": 20}))
    (tmp_path / "metrics/transfer").mkdir(parents=True)
    (tmp_path / "metrics/transfer/model_b.json").write_text(json.dumps({"seeds": [{"train_seconds": 3}, {"train_seconds": 4}]}))
    est = repro.estimated_durations(["experiment@slow", "experiment@new", "model_b"], overhead=10)
    assert est == {"experiment@slow": 90.0, "experiment@new": 10.0, "model_b": 17.0}
