"""Executing runs: each stage is a ``python run.py <stage> ...`` subprocess, output in ``log.txt``.

``execute`` is the one code path of a run; ``LocalExecutor`` calls it from a pool of threads (the
work happens in the subprocesses), ``SubmititExecutor`` ships it to SLURM job arrays (or to
submitit's local processes, to debug that path without a cluster).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from datamodules.base import usable_cores
from lightning_modules.sweeps.grid import ROOT
from lightning_modules.sweeps.plan import RunSpec
from lightning_modules.sweeps.state import DONE, FAILED

RUN_PY = ROOT / "run.py"
ARRAY_SIZE = 1000  # SLURM's default MaxArraySize is 1001
#: The stage of a fit that continues from its own ``last.ckpt`` (``run.py fit --ckpt_path last``).
RESUME = "fit-resume"
OnStart = Callable[..., None]
OnDone = Callable[[RunSpec, "RunResult"], None]
Todo = Sequence[tuple[RunSpec, tuple[str, ...]]]


@dataclass
class RunResult:
    """How one run ended: ``status`` is done or failed, ``error`` the failure's last line."""

    status: str
    error: str | None
    seconds: float


def _task_rank() -> int:
    """This task's rank inside a multi-task SLURM job (one task per GPU), else 0."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


def last_error(text: str) -> str:
    """The line that says why a run failed: ``error: ...``, else an exception line, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*", line):
            return line
    return lines[-1] if lines else "no output"


def run_stage(command: list[str], log: IO[str], cwd: str, env: dict[str, str]) -> int:
    """Runs one ``run.py`` command with its output appended to ``log``; returns the exit code."""
    return subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode


def execute(run: RunSpec, stages: tuple[str, ...], env: dict[str, str] | None = None) -> RunResult:
    """Runs ``stages`` of ``run`` one after the other; stops at the first that fails."""
    start = time.perf_counter()
    rank = _task_rank()
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run.run_dir / ("log.txt" if rank == 0 else f"log_rank{rank}.txt")
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a") as log:
        for stage in stages:
            if stage == RESUME:
                command = [sys.executable, str(RUN_PY), "fit", *run.args(), "--ckpt_path", "last"]
            else:
                command = [sys.executable, str(RUN_PY), stage, *run.args()]
            log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
            log.flush()
            offset = log.tell()
            code = run_stage(command, log, run.cwd, env)
            if code != 0:
                log.flush()
                with open(log_path, errors="replace") as f:
                    f.seek(offset)
                    tail = f.read()[-20000:]
                reason = last_error(tail) if code > 0 else f"killed by signal {-code}"
                return RunResult(FAILED, f"{stage}: {reason}", time.perf_counter() - start)
    if rank == 0 and not run.marker.is_file():
        return RunResult(FAILED, f"finished without writing {run.marker.name}", time.perf_counter() - start)
    return RunResult(DONE, None, time.perf_counter() - start)


class LocalExecutor:
    """Up to ``max_parallel`` runs at once on this machine.

    SLURM variables are dropped from the runs' environment: Lightning would otherwise take a run
    started inside an allocation for one rank of a multi-task job.
    """

    def __init__(self, max_parallel: int = 1) -> None:
        self.max_parallel = max_parallel

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        if self.max_parallel > 1 and "OMP_NUM_THREADS" not in env:  # share the cores, not oversubscribe
            env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // self.max_parallel))
        return env

    def run(self, todo: Todo, on_start: OnStart, on_done: OnDone) -> None:
        env = self._env()

        def task(run: RunSpec, stages: tuple[str, ...]) -> RunResult:
            on_start(run)
            return execute(run, stages, env)

        pool = ThreadPoolExecutor(self.max_parallel)
        try:
            futures = {pool.submit(task, run, stages): run for run, stages in todo}
            for future in as_completed(futures):
                run = futures[future]
                try:
                    result = future.result()
                except Exception as err:  # noqa: BLE001 - an I/O error of one run must not stop the sweep
                    result = RunResult(FAILED, f"{type(err).__name__}: {err}", 0.0)
                on_done(run, result)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class SubmititExecutor:
    """Runs through submitit: a SLURM job array (``cluster="slurm"``) or local processes (``"local"``).

    With more than one GPU per node the job has one task per GPU (``--ntasks-per-node``): every
    task runs ``execute``, whose ``run.py`` then joins Lightning's SLURM process group as one rank.
    """

    def __init__(self, folder: Path, cluster: str, slurm: dict[str, Any], max_parallel: int, name: str) -> None:
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if cluster == "slurm" and missing:
            raise ValueError(f"--executor slurm needs SLURM's {' and '.join(missing)} on PATH; run on a cluster "
                             "login node or use --executor local.")
        self.folder, self.cluster, self.max_parallel = Path(folder), cluster, max_parallel
        gpus = int(slurm.get("gpus_per_node") or 0)
        setup = [f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}", *(slurm.get("setup") or [])]
        self.params: dict[str, Any] = {
            "name": name,
            "timeout_min": int(slurm.get("time_min") or 240),
            "nodes": int(slurm.get("nodes") or 1),
            "gpus_per_node": gpus,
            "tasks_per_node": max(1, gpus),
            "cpus_per_task": int(slurm.get("cpus_per_task") or 4),
            "slurm_array_parallelism": max_parallel,
            "slurm_setup": setup,
        }
        if slurm.get("mem_gb"):
            self.params["mem_gb"] = int(slurm["mem_gb"])
        for key in ("partition", "account", "qos", "constraint", "additional_parameters"):
            if slurm.get(key):
                self.params[f"slurm_{key}"] = slurm[key]

    def make(self) -> Any:
        """The configured ``submitit.AutoExecutor``."""
        import submitit

        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        executor.update_parameters(**self.params)
        return executor

    def run(self, todo: Todo, on_start: OnStart, on_done: OnDone) -> None:
        if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):  # local jobs import us
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        executor = self.make()
        todo = list(todo)
        if self.cluster == "slurm":  # all arrays at once (SLURM throttles them), <= 1000 elements each
            self._wait(executor, [self._submit(executor, todo[i:i + ARRAY_SIZE], on_start)
                                  for i in range(0, len(todo), ARRAY_SIZE)], on_done)
            return
        for i in range(0, len(todo), self.max_parallel):  # submitit's local jobs would all start at once
            self._wait(executor, [self._submit(executor, todo[i:i + self.max_parallel], on_start)], on_done)

    @staticmethod
    def _submit(executor: Any, batch: Todo, on_start: OnStart) -> list[tuple[RunSpec, Any]]:
        jobs = executor.map_array(execute, [r for r, _ in batch], [s for _, s in batch])
        for (run, _), job in zip(batch, jobs, strict=True):
            on_start(run, job_id=job.job_id)
        return [(run, job) for (run, _), job in zip(batch, jobs, strict=True)]

    @staticmethod
    def _wait(executor: Any, arrays: list[list[tuple[RunSpec, Any]]], on_done: OnDone) -> None:
        import submitit

        runs = {job.job_id: run for array in arrays for run, job in array}
        for job in submitit.helpers.as_completed([job for array in arrays for _, job in array]):
            try:
                result = job.result()
            except Exception as err:  # noqa: BLE001 - a killed / timed-out job fails its run only
                result = RunResult(FAILED, f"job {job.job_id}: {last_error(str(err))}", 0.0)
            on_done(runs[job.job_id], result)


def slurm_job_alive(job_id: str) -> bool:
    """Whether SLURM still lists ``job_id`` (pending or running)."""
    if shutil.which("squeue") is None:
        return False
    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, check=False)
    return out.returncode == 0 and bool(out.stdout.strip())
