"""The params guard: the first stage of each DVC pipeline (``check_params``; see ``registry.params_guard``).

It depends on every key of params.yaml and every other stage is downstream of its output, so DVC runs it
first: a value the schema rejects stops ``dvc repro`` / ``dvc exp run`` before DVC deletes any stage's outputs,
and since nothing ran, dvc.lock (and the git index, which DVC's autostage would touch) stays as it was.

``dvc exp run -S key=value`` writes the override into params.yaml before the guard runs, and DVC leaves it
there when the run fails. So when the guard rejects the params of a workspace ``dvc exp run``, it takes DVC's
``-S`` edits back out of params.yaml (``restore_before_set``): the file is as it was before the command.
"""
from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .io import atomic_path, write_json

log = logging.getLogger("components.params_guard")

EXP_ENV = "DVC_EXP_NAME"  # set by DVC for the stages of a `dvc exp run`


def run(params: Any, out_path: Path) -> None:
    """The params are valid (``python -m components`` validated them before calling this): write the guard's
    output. Its content never changes, so a re-run of the guard re-runs nothing downstream."""
    write_json(out_path, {"params": "valid"})


def _exp_run_argv(proc: Any) -> list[str] | None:
    """The arguments after ``dvc`` when ``proc`` is a ``dvc ... exp run ...`` process, else None."""
    try:
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return None
    for i, part in enumerate(cmd):
        if os.path.basename(part) == "dvc" or (part == "dvc" and i and cmd[i - 1] == "-m"):
            rest = cmd[i + 1:]
            return rest if "exp" in rest and "run" in rest else None
    return None


def exp_run_overrides(params_name: str = "params.yaml") -> list[str] | None:
    """The ``-S`` overrides of the ``dvc exp run`` that runs this stage, for ``params_name`` (DVC's own parsing);
    None when no such command is found (a queued experiment's worker, a stage run by hand)."""
    import psutil
    from dvc.cli import parse_args
    from dvc.utils.cli_parse import to_path_overrides

    me = psutil.Process()
    candidates = [_exp_run_argv(p) for p in me.parents()]
    found = [a for a in candidates if a is not None]
    if not found:  # not a descendant (e.g. forked by a long-lived stage server): the one exp run in this repo
        root = os.path.realpath(os.environ.get("DVC_ROOT", os.getcwd()))
        for p in psutil.process_iter():
            argv = _exp_run_argv(p)
            try:
                inside = argv is not None and (os.path.realpath(p.cwd()) + os.sep).startswith(root + os.sep)
            except Exception:  # noqa: BLE001
                inside = False
            if inside:
                found.append(argv)
        if len(found) != 1:
            return None
    try:
        args = parse_args(found[0])
    except (SystemExit, Exception):  # noqa: BLE001 - not a command line DVC itself would accept
        return None
    return to_path_overrides(getattr(args, "set_param", None) or []).get(params_name, [])


def restore_before_set(params_file: Path, overrides: list[str]) -> bool:
    """Take the ``-S`` ``overrides`` that DVC applied back out of ``params_file``; True if it did.

    DVC applied them to the file as it was (the commit's version plus any edits not committed). The edits are
    kept: with the commit's version ``H``, the same overrides applied to it ``G`` (by DVC's own code), and the
    current file ``F``, the change from ``G`` to ``H`` (the overrides, undone) is merged into ``F`` by
    ``git merge-file``; without edits ``F == G`` and the result is ``H`` byte for byte. A conflict (an edit
    on the same lines as an override) leaves the file alone.
    """
    from dvc.utils.hydra import apply_overrides

    params_file = Path(params_file)
    head = subprocess.run(["git", "show", f"HEAD:./{params_file.name}"], cwd=params_file.parent or ".",
                          capture_output=True)
    if head.returncode != 0:
        return False
    with tempfile.TemporaryDirectory(prefix="ch11-params-") as tmp:
        base, other, current = Path(tmp, "set.yaml"), Path(tmp, "head.yaml"), Path(tmp, "now.yaml")
        other.write_bytes(head.stdout)
        base.write_bytes(head.stdout)
        current.write_bytes(params_file.read_bytes())
        try:
            apply_overrides(base, overrides)
        except Exception:  # noqa: BLE001 - the overrides do not apply to the committed file
            return False
        merged = subprocess.run(["git", "merge-file", "-p", str(current), str(base), str(other)], capture_output=True)
        if merged.returncode != 0:  # conflicts (> 0) or an error (< 0)
            return False
    with atomic_path(params_file) as tmp_file:
        tmp_file.write_bytes(merged.stdout)
    return True


def after_rejection(params_file: Path | None) -> str:
    """What the guard says after the schema rejected the params (the error itself is logged before it)."""
    params_file = Path(params_file or "params.yaml")
    done = "nothing ran: every output and dvc.lock are as they were"
    if not os.environ.get(EXP_ENV):
        return f"{done}; fix {params_file} and rerun"
    try:
        overrides = exp_run_overrides(params_file.name)
    except ImportError:  # DVC's modules absent: not a DVC run after all
        overrides = None
    if overrides is None:
        return (f"{done}; {params_file} may still hold `dvc exp run -S` values: fix it, or `git checkout -- "
                f"{params_file}` to drop its edits")
    if not overrides:
        return f"{done}; fix {params_file} and rerun"
    if restore_before_set(params_file, overrides):
        return (f"{done}; {params_file} is back as it was before `-S {' -S '.join(overrides)}`: "
                "fix the value and rerun `dvc exp run`")
    return (f"{done}; could not take `-S {' -S '.join(overrides)}` back out of {params_file} (it conflicts with "
            f"edits not committed): fix the value there by hand")
