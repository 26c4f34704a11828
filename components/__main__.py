"""``python -m components <step> [--params params.yaml] [-S key=value ...]``: run one step as DVC does."""
from __future__ import annotations

import argparse
import errno
import re
import sys
from pathlib import Path

from . import config, process, registry
from .config import ParamsError, load_params
from .io import DiskFullError, Terminated, disk_full_message, setup_logging, stop_on_sigterm


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m components", description=__doc__)
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for s in (s for pipeline in registry.PIPELINES.values() for s in pipeline.dvc_steps):
        p = sub.add_parser(s.name, help=s.description)
        if s.foreach:
            p.add_argument("name", help=f"which entry of '{s.foreach}' in params.yaml")
        if s.seeds:
            p.add_argument("--seed", type=int, required=True, help=f"the seed of this run (one of '{s.seeds}')")
        _params_args(p)
        p.add_argument("--bind", action="append", default=[], metavar="ARG=PATH",
                       help=f"read/write this path instead of the DVC workspace's ({', '.join(s.paths)})")
    sub.add_parser("render-dvc", help="print dvc.yaml as rendered from the step registry").add_argument(
        "pipeline", nargs="?", default="main", choices=list(registry.PIPELINES),
        help="main: dvc.yaml (the chapter); cifar10: cifar10/dvc.yaml (exercise 8)")
    check = sub.add_parser("check-params", help="validate params.yaml (with the overrides) and exit")
    check.add_argument("pipeline", nargs="?", default="main", choices=list(registry.PIPELINES),
                       help="whose schema: main (params.yaml, the default) or cifar10 (cifar10/params.yaml)")
    _params_args(check)
    args = parser.parse_args(argv)

    if args.step == "render-dvc":
        sys.stdout.write(registry.render_dvc_yaml(args.pipeline))
        return 0
    log = setup_logging(args.step)
    stop_on_sigterm()
    pipeline = registry.PIPELINES[args.pipeline] if args.step == "check-params" else registry.pipeline_of(args.step)
    try:
        params = load_params(getattr(args, "params", None), getattr(args, "set", None), getattr(config, pipeline.schema))
    except ParamsError as err:
        log.error("%s", err)
        if args.step != "check-params" and registry.is_guard(registry.get(args.step)):
            from .params_guard import after_rejection

            log.error("%s", after_rejection(getattr(args, "params", None)))
        if pipeline.directory != "." and not pipeline.shared_workspace:
            log.error("the %s steps read %s/params.yaml: run them from %s/ (e.g. `cd %s && dvc repro`)",
                      pipeline.name, pipeline.directory, pipeline.directory, pipeline.directory)
        return 2
    if args.step == "check-params":
        log.info("params are valid")
        return 0
    step = registry.get(args.step)
    item = getattr(args, "name", None)
    if step.foreach:
        entries = registry.foreach_entries(params, step.foreach)
        if item not in entries:
            log.error("no %r in %s of params.yaml; choose one of: %s", item, step.foreach, ", ".join(entries))
            return 2
    seed = getattr(args, "seed", None)
    if step.seeds:
        params = registry.with_seed(params, seed)
    paths: dict = {k: Path(v) for k, v in step.bind(item, seed).items()}
    for b in args.bind:
        key, _, path = b.partition("=")
        if key not in paths or not path:
            log.error("--bind %r: expected ARG=PATH with ARG one of %s", b, ", ".join(paths))
            return 2
        paths[key] = Path(path)
    dvc = process.dvc_command()
    if dvc is not None:  # `dvc repro` killed -> this step stops too, rather than write on beside a rerun
        process.die_with(dvc)
    outputs = [paths[k] for k in (*step.outputs, *step.metrics, *step.plots)]
    try:
        with process.hold_outputs(step.name + (f"@{item}" if item else "") + (f"@{seed}" if seed is not None else ""),
                                  Path(params.runtime.checkpoint_dir) / "locks", outputs):
            process.clean_stale_tmp(outputs)
            registry.call(step, params, item, paths)
    except KeyboardInterrupt as err:
        log.error("%s; rerun the same command to resume", "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted")
        return 143 if isinstance(err, Terminated) else 130
    except Exception as err:  # noqa: BLE001 - one clear line for the user, the traceback with LOGLEVEL=DEBUG
        log.debug("traceback", exc_info=True)
        log.error("%s", explain(err, step, item, paths))
        return 1
    return 0


def explain(err: Exception, step: registry.Step, item: str | None, paths: dict) -> str:
    """One line for a failed step: what happened and, for a missing input or a full disk, what to do."""
    if isinstance(err, (registry.MissingInput, DiskFullError)):
        return str(err)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full_message(err.filename)
    if isinstance(err, FileNotFoundError):  # a file inside an input folder (pyarrow puts the path in the message)
        quoted = re.search(r"'([^']+)'", str(err))  # pyarrow: "Failed to open local file '<path>'. Detail: ..."
        missing = err.filename or (err.args[0] if len(err.args) == 1 else quoted.group(1) if quoted else None)
        hint = registry.missing_hint(step, item, paths, missing) if isinstance(missing, (str, Path)) else None
        if hint:
            return hint
    return f"{type(err).__name__}: {err}"


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default=None, help="params file (default: params.yaml or $PARAMS_FILE)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param for this run only, e.g. -S data.valid_size=100; "
                        "+KEY=VALUE may add a new entry, e.g. -S +experiments.my_elu.model.activation=elu")


if __name__ == "__main__":
    sys.exit(main())
