"""Many runs: a YAML grid -> ``run.py`` runs (local processes or SLURM) -> results table and plots.

    python sweep.py run configs/sweeps/demo.yaml [--executor local|slurm|submitit-local]
        [--max-parallel N] [--dry-run] [--out DIR] [--force] [--partition P --gpus-per-node G ...]
    python sweep.py report sweeps/demo

A sweep file::

    name: demo                              # default: the file name; output in sweeps/<name> (or out:)
    configs: [configs/demo.yaml]            # every run: configs/base.yaml, these, then the axes
    overrides: {trainer.max_epochs: 3}      # every run: fixed run.py options
    grid:                                   # one run per combination, named from its values
      method: [configs/peft/bitfit.yaml, configs/peft/lora.yaml]   # YAML values: a config-file axis
      data.init_args.train_fraction: [0.25, 1.0]                    # dotted key: an override axis
      seed_everything: [0, 1]                                       # seeds: mean ± std in the report
    exclude:                                # drop the combinations matching every key of a rule
      - {method: lora, data.init_args.train_fraction: 0.25}        # a value, its file stem, or a list
    tune:                                   # optional: per group (all axes but the seed), pick one
      axis: model.init_args.optimizer.init_args.lr                  # value on the validation score of
      values: [1.0e-4, 1.0e-3]                                      # the checkpoint callback (never on
      seeds: [0]                                                    # test), then run the grid with it
    slurm: {partition: gpu, gpus_per_node: 1, cpus_per_task: 8, time_min: 240, account: null}
    report: {rows: method, tables: [backbone], x: data.init_args.train_fraction, metrics: [auroc, acc]}
    max_parallel: 2

Output: ``<out>/runs/<run name>/`` holds ``log.txt`` and run.py's ``version_0/`` (config.yaml,
TensorBoard events, checkpoints, fit_summary.json, metrics.json); tuning runs live in ``<out>/tune/``.
``<out>/sweep_state.json`` records every run's status; a rerun skips finished runs, retries failed or
missing ones, and never overwrites a finished run without ``--force``. A run finished with other
settings than the sweep file's current ones is kept as ``stale``: left out of the report's tables and
of the tuning selection until ``--force`` reruns it. ``selection.json`` holds the tuned values (a value
with any failed, unfinished or stale tuning run is excluded, with the reason); ``results.csv``,
``results.md`` and ``plot_*.png`` the report (rewritten by ``report``).

Multi-GPU and multi-node runs: add ``configs/trainer/ddp.yaml`` to ``configs:`` and give each run
GPUs with ``slurm: {gpus_per_node: 4, nodes: 2}`` (or ``--gpus-per-node 4 --nodes 2``). Each run is
then one SLURM job (an element of the sweep's job array) with ``--ntasks-per-node`` = GPUs per node:
every task starts ``run.py`` under ``srun``, Lightning's SLURM environment makes each one a DDP rank,
and the sweep passes ``--trainer.devices 4 --trainer.num_nodes 2`` to match. On one multi-GPU machine
use ``--executor local`` with ``configs/trainer/ddp.yaml``: run.py starts one process per GPU itself.
Metrics are reduced across ranks and only rank 0 writes checkpoints, fit_summary.json and metrics.json.
"""

from __future__ import annotations

import argparse
import fcntl
import shutil
import sys
from pathlib import Path
from typing import Any

from lightning_modules.results import write_json_atomic
from lightning_modules.sweeps.executors import (
    RESUME,
    LocalExecutor,
    RunResult,
    SubmititExecutor,
    slurm_job_alive,
)
from lightning_modules.sweeps.grid import Sweep, format_value, load_sweep
from lightning_modules.sweeps.plan import FINAL, RunSpec, final_runs, group_of, inside, tune_runs
from lightning_modules.sweeps.protocol import resolve_config, runs_to_check, select, tune_target
from lightning_modules.sweeps.report import SWEEP_INFO, write_report
from lightning_modules.sweeps.state import DONE, FAILED, RUNNING, STALE, SweepState, run_status

SLURM_FLAGS = ("partition", "account", "gpus_per_node", "nodes", "cpus_per_task", "time_min")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the sweep of a sweep YAML file")
    run.add_argument("sweep", help="sweep file, e.g. configs/sweeps/demo.yaml")
    run.add_argument("--executor", choices=("local", "slurm", "submitit-local"), default="local",
                     help="local processes, SLURM job arrays, or the SLURM path run as local processes")
    run.add_argument("--max-parallel", type=int, default=None, help="runs at once (default: the file's, else 1)")
    run.add_argument("--dry-run", action="store_true", help="check and list the runs; write nothing")
    run.add_argument("--out", default=None, help="output directory (default: the file's out, else sweeps/<name>)")
    run.add_argument("--force", action="store_true", help="rerun finished runs too (overwrites them)")
    for flag in SLURM_FLAGS:
        run.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=None,
                         type=str if flag in ("partition", "account") else int, help=f"SLURM {flag}")
    report = sub.add_parser("report", help="write results.csv, results.md and plots of a sweep directory")
    report.add_argument("directory", help="the sweep's output directory")
    return parser


def make_executor(args: argparse.Namespace, sweep: Sweep, max_parallel: int) -> Any:
    """The executor, checked before anything runs (sbatch present, known SLURM keys)."""
    if args.executor == "local":
        return LocalExecutor(max_parallel)
    slurm = {**sweep.slurm, **{k: getattr(args, k) for k in SLURM_FLAGS if getattr(args, k) is not None}}
    cluster = "slurm" if args.executor == "slurm" else "local"
    executor = SubmititExecutor(sweep.out / "slurm", cluster, slurm, max_parallel, f"sweep-{sweep.name}")
    gpus, nodes = int(slurm.get("gpus_per_node") or 0), int(slurm.get("nodes") or 1)
    if cluster == "slurm" and (gpus > 1 or nodes > 1):  # Lightning checks these against SLURM's tasks
        sweep.overrides.setdefault("trainer.devices", max(gpus, 1))
        sweep.overrides.setdefault("trainer.num_nodes", nodes)
    return executor


def plan(sweep: Sweep, run_module: Any) -> tuple[list[RunSpec], list[RunSpec], tuple[str, str] | None]:
    """Tuning runs, final runs (tuned axis at its first value until selected) and the tuning target."""
    tune = tune_runs(sweep)
    placeholder = {group_of(sweep, p): sweep.tune.values[0] for p in sweep.points()} if sweep.tune else None
    finals = final_runs(sweep, placeholder)
    for run in tune + finals:
        if not inside(run.run_dir, sweep.out):
            raise ValueError(f"run name '{run.name}' would leave the sweep directory {sweep.out}.")
    print(f"checking {len(runs_to_check(tune + finals))} run configurations with run.py ...", file=sys.stderr)
    describe = getattr(run_module, "parse_error_message", None)
    configs = [resolve_config(run, run_module.cli_main, describe) for run in runs_to_check(tune + finals)]
    target = tune_target(sweep.tune, configs, str(sweep.path)) if sweep.tune else None
    return tune, finals, target


def print_plan(sweep: Sweep, tune: list[RunSpec], finals: list[RunSpec]) -> None:
    tuned = sweep.tune.axis if sweep.tune else None

    def show(run: RunSpec, final: bool) -> None:
        name = run.name
        extra = [f"--config {_rel(c)}" for c in run.configs[len(sweep.configs):]]
        for key, value in run.overrides[len(sweep.overrides):]:
            shown = "<tuned>" if final and key == tuned else format_value(value)
            extra.append(f"--{key} {shown}")
        if final and sweep.tune:  # the tuned value ends the name
            head, _, _ = name.rpartition("__")
            name = f"{head}{'__' if head else ''}{sweep.tune.label}=<tuned>"
        print(f"  {name}\n      {' '.join(extra)}")

    if tune:
        print(f"tuning stage ({len(tune)} runs, fit only, selected on validation):")
        for run in tune:
            show(run, final=False)
    print(f"{'final ' if tune else ''}runs ({len(finals)}) -> {sweep.out / 'runs'}:")
    for run in finals:
        show(run, final=True)


def _rel(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else path


def prepare(run: RunSpec, entry: dict[str, Any], force: bool) -> tuple[str, ...]:
    """Stages still to run: a finished fit is kept, a stopped one (pre-empted, killed) resumes from its
    ``last.ckpt``, any other unfinished attempt is removed first."""
    fit_done = (run.version_dir / "fit_summary.json").is_file() and (
        run.version_dir / "checkpoints" / "best.ckpt").is_file()
    same = not force and entry.get("fingerprint") == run.fingerprint()
    if same and run.stage == FINAL and fit_done:
        return ("test",)
    if same and not fit_done and (run.version_dir / "checkpoints" / "last.ckpt").is_file():
        return (RESUME, *run.stages[1:])  # exact resume: the same batches as an uninterrupted run
    if run.version_dir.exists() and inside(run.version_dir, Path(run.save_dir)):
        shutil.rmtree(run.version_dir)
    return run.stages


def execute_stage(title: str, runs: list[RunSpec], state: SweepState, executor: Any, force: bool) -> int:
    """Runs what is not finished yet; returns the number of failed runs."""
    todo, stale = [], 0
    for run in runs:
        entry = state.entry(run)
        status = run_status(run, entry)
        if status in (DONE, STALE) and not force:  # finished runs are only overwritten with --force
            if status == STALE:
                stale += 1
                print(f"  {run.name}: finished with other settings; kept but left out of the report and the "
                      "tuning selection (use --force to rerun)", file=sys.stderr)
            if entry.get("status") != status:
                state.update(run, status)
            continue
        job = entry.get("job_id")
        if entry.get("status") == RUNNING and job and isinstance(executor, SubmititExecutor) \
                and executor.cluster == "slurm" and slurm_job_alive(job):
            print(f"  {run.name}: still in SLURM job {job}; not resubmitted", file=sys.stderr)
            continue
        todo.append((run, prepare(run, entry, force)))
    kept = f" ({stale} with other settings, not rerun without --force)" if stale else ""
    print(f"{title}: {len(runs) - len(todo)} of {len(runs)} runs already finished{kept}, {len(todo)} to run")
    failed = 0

    def on_start(run: RunSpec, **fields: Any) -> None:
        state.update(run, RUNNING, **fields)
        print(f"  start  {run.name}", flush=True)

    def on_done(run: RunSpec, result: RunResult) -> None:
        nonlocal failed
        state.update(run, result.status, error=result.error, seconds=round(result.seconds, 1))
        if result.status == FAILED:
            failed += 1
            print(f"  FAILED {run.name}: {result.error}", flush=True)
        else:
            print(f"  done   {run.name} ({result.seconds:.0f} s)", flush=True)

    if todo:
        executor.run(todo, on_start, on_done)
    return failed


def cmd_run(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep, args.out)
    if args.max_parallel is not None and args.max_parallel < 1:
        raise ValueError(f"--max-parallel must be at least 1, got {args.max_parallel}.")
    max_parallel = args.max_parallel or sweep.max_parallel or 1
    executor = make_executor(args, sweep, max_parallel)
    import run as run_module  # run.py's own parser checks every configuration

    tune, finals, target = plan(sweep, run_module)
    if args.dry_run:
        print_plan(sweep, tune, finals)
        return 0
    sweep.out.mkdir(parents=True, exist_ok=True)
    with open(sweep.out / ".sweep.lock", "w") as lock:  # one sweep process per output directory
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another 'sweep.py run' is using {sweep.out}; wait for it to end or pass another "
                             "--out.") from None
        return execute_sweep(sweep, executor, tune, finals, target, args.force)


def execute_sweep(sweep: Sweep, executor: Any, tune: list[RunSpec], finals: list[RunSpec],
                  target: tuple[str, str] | None, force: bool) -> int:
    """The tuning stage (if any), the selection, the final runs and the report; 1 if anything failed."""
    info = {"name": sweep.name, "sweep_file": str(sweep.path), "report": sweep.report,
            "axes": [{"key": a.key, "label": a.label, "is_config": a.is_config} for a in sweep.axes],
            "tune": {"axis": sweep.tune.axis, "label": sweep.tune.label} if sweep.tune else None}
    write_json_atomic(sweep.out / SWEEP_INFO, info)
    state = SweepState(sweep.out, str(sweep.path))
    failed = 0
    if sweep.tune and target:
        state.register(tune, "tune")
        failed += execute_stage("tuning", tune, state, executor, force)
        chosen = select(sweep.tune, tune, *target, state.runs)
        write_json_atomic(sweep.out / "selection.json", chosen)
        selection = {g: e["selected"] for g, e in chosen["groups"].items() if "selected" in e}
        for group in sorted(set(chosen["groups"]) - set(selection)):
            failed += 1
            reasons = "; ".join(r for rs in chosen["groups"][group]["excluded"].values() for r in rs)
            print(f"  group {group}: no tuned value has all its tuning runs finished ({reasons}); its final runs "
                  "are skipped", flush=True)
        finals = final_runs(sweep, selection)
    state.register(finals, FINAL)
    failed += execute_stage("runs", finals, state, executor, force)
    files = write_report(sweep.out)
    print(f"report: {', '.join(_rel(str(f)) for f in files)}")
    if failed:
        print(f"error: {failed} run(s) or group(s) failed; see {_rel(str(state.path))} and each run's log.txt, "
              f"then rerun the same command to retry them.", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: input errors end with one ``error: ...`` line and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            files = write_report(args.directory)
            print("\n".join(_rel(str(f)) for f in files))
            return 0
        return cmd_run(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished runs are kept: rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
