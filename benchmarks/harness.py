"""Shared benchmark machinery: interleaved timing, PEFT configs from YAML, model and step builders.

Timing policy: every measurement family runs its cases side by side in one process, alternating
them round by round (the starting case rotates), with warm-up runs excluded. A ratio is the fastest
round of the case over the fastest round of the reference: on a shared machine other jobs only ever
add time (cache, memory-bandwidth and core contention), in bursts that can cover most of a round,
so the fastest round is the best estimate of a case's own cost (the step ratios also record the
median over rounds of the same-round ratio: ``details.step_ratio.paired_median_ratio``). Every ratio is measured by two clocks:
wall time, and process CPU time, which excludes the time the scheduler gave to other jobs
(``--clock`` picks the reported one).
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from peft_methods.base import PeftMethod, build_method

ROOT = Path(__file__).resolve().parents[1]
PEFT_CONFIGS = ROOT / "configs" / "peft"
VIT = "vit_small_patch16_224"
RESNET = "resnet50"
IMAGE_SIZE = 224
BATCH = 8
NUM_CLASSES = 3
#: ``--precision`` of ``python -m benchmarks``, inherited by the per-config memory subprocesses.
PRECISION_ENV = "MEDPEFT_BENCH_PRECISION"


def precision() -> str:
    """The Lightning precision of every measurement: ``--precision``, else what a run on this CPU picks.

    bf16 autocast only pays off where the CPU computes bf16 natively; elsewhere runs train in 32-true
    (``lightning_modules.precision``), and so do the benchmarks.
    """
    from lightning_modules.precision import auto_precision

    return os.environ.get(PRECISION_ENV) or auto_precision("cpu")[0]


def autocast() -> contextlib.AbstractContextManager:
    """The forward-pass context of ``precision()``: bf16 autocast, or nothing for 32-true."""
    if precision().startswith("bf16"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Timings:
    """Per-round wall and CPU seconds of one case (each the fastest of that round's repeats)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)

    @property
    def fastest(self) -> float:
        return min(self.wall)

    @property
    def fastest_cpu(self) -> float:
        return min(self.cpu)


class RoundBudget:
    """Whether a measurement starts another round: always until ``min_rounds`` are done, then only if
    it would end (taken as long as the last round) within ``max_seconds`` of the budget's creation.

    ``max_seconds=None``: no limit. On a busy host this keeps a measurement's time bounded by giving
    up rounds, which the result records, instead of running long.
    """

    def __init__(self, max_seconds: float | None, min_rounds: int,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if min_rounds < 1:
            raise ValueError(f"min_rounds must be at least 1, got {min_rounds}.")
        self.max_seconds, self.min_rounds, self.clock = max_seconds, min_rounds, clock
        self.start = clock()
        self._round_start: float | None = None
        self._last_round_seconds = 0.0

    def allows_round(self, done: int) -> bool:
        """Called before each round with the number of rounds done: whether to run it."""
        now = self.clock()
        if self._round_start is not None:
            self._last_round_seconds = now - self._round_start
        predicted_end = now + self._last_round_seconds - self.start
        if self.max_seconds is not None and done >= self.min_rounds and predicted_end > self.max_seconds:
            return False
        self._round_start = now
        return True


def interleaved(
    cases: dict[str, Callable[[], Any]], rounds: int, repeats: int = 1, warmup: int = 1,
    max_seconds: float | None = None, min_rounds: int = 1,
) -> dict[str, Timings]:
    """Times every case ``repeats`` times per round (keeping the fastest) for ``rounds`` rounds, cases alternating.

    With ``max_seconds``, a round after the first ``min_rounds`` runs only if it is predicted (as long
    as the previous round) to end within that time of the call, warm-up included (``RoundBudget``);
    every case has as many rounds as the others.
    Garbage collection is paused while timing so that it does not land on one case by chance.
    """
    budget = RoundBudget(max_seconds, max(1, min(min_rounds, rounds)))
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    out = {n: Timings() for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            if not budget.allows_round(r):
                break
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                wall, cpu = [], []
                for _ in range(repeats):
                    w0, c0 = time.perf_counter(), time.process_time()
                    cases[name]()
                    wall.append(time.perf_counter() - w0)
                    cpu.append(time.process_time() - c0)
                out[name].wall.append(min(wall))
                out[name].cpu.append(min(cpu))
    finally:
        gc.enable()
    return out


def adjacent_ratios(
    cases: dict[str, Callable[[], Any]], ref: Callable[[], Any], rounds: int, repeats: int = 3, warmup: int = 1,
    ref_rounds: Timings | None = None, max_seconds: float | None = None, min_rounds: int = 1,
) -> dict[str, dict[str, float]]:
    """Ratio of each case to ``ref`` with the two run back to back (ref, case, case, ref, ...).

    For short runs (an inference batch) whose noise is bursty: each case is compared with the
    reference runs interleaved with its own (the order alternates over repeats and rounds, so
    neither side is always second, also with one repeat; the starting case rotates per round); the
    result is ``ratio`` of the case's fastest run over the fastest of those reference runs. The
    reference's fastest run of every case's round is also appended to ``ref_rounds`` when given.
    ``max_seconds`` / ``min_rounds``: the rounds' time budget, warm-up included, as in ``interleaved``.
    """
    budget = RoundBudget(max_seconds, max(1, min(min_rounds, rounds)))
    names = list(cases)
    for fn in (ref, *cases.values()):
        for _ in range(warmup):
            fn()
    per_round: dict[str, tuple[Timings, Timings]] = {n: (Timings(), Timings()) for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            if not budget.allows_round(r):
                break
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                runs = {"ref": Timings(), "case": Timings()}
                for k in range(repeats):
                    pair = (("ref", ref), ("case", cases[name]))
                    for kind, fn in pair if (k + r) % 2 == 0 else pair[::-1]:
                        w0, c0 = time.perf_counter(), time.process_time()
                        fn()
                        runs[kind].wall.append(time.perf_counter() - w0)
                        runs[kind].cpu.append(time.process_time() - c0)
                case_t, ref_t = per_round[name]
                for t, kind in ((case_t, "case"), (ref_t, "ref"), (ref_rounds, "ref")):
                    if t is None:
                        continue
                    t.wall.append(runs[kind].fastest)
                    t.cpu.append(runs[kind].fastest_cpu)
    finally:
        gc.enable()
    return {n: ratio(*per_round[n]) for n in names}


def paired_ratio(case: Timings, ref: Timings, cpu: bool = False) -> float:
    """Median over rounds of case / reference (same round)."""
    a, b = (case.cpu, ref.cpu) if cpu else (case.wall, ref.wall)
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def ratio(case: Timings, ref: Timings) -> dict[str, float]:
    """Fastest round of ``case`` / fastest round of ``ref`` by both clocks: ``{"wall": ..., "cpu": ...}``."""
    return {"wall": round(case.fastest / ref.fastest, 3), "cpu": round(case.fastest_cpu / ref.fastest_cpu, 3)}


def paired_median_ratio(case: Timings, ref: Timings) -> dict[str, float]:
    """``paired_ratio`` by both clocks (the median over rounds of the same-round ratio)."""
    return {"wall": round(paired_ratio(case, ref), 3), "cpu": round(paired_ratio(case, ref, cpu=True), 3)}


def ratios(times: dict[str, Timings], ref: str) -> dict[str, dict[str, float]]:
    """``ratio`` of every case but ``ref`` against ``ref``."""
    return {n: ratio(t, times[ref]) for n, t in times.items() if n != ref}


def seconds(times: dict[str, Timings]) -> dict[str, dict[str, float]]:
    """Seconds of every case's fastest round by both clocks (what ``ratio`` divides)."""
    return {n: {"wall": round(t.fastest, 4), "cpu": round(t.fastest_cpu, 4)} for n, t in times.items()}


def now() -> tuple[float, float]:
    """(wall, process CPU) seconds."""
    return time.perf_counter(), time.process_time()


def cpu_identity(cpuinfo: str) -> dict[str, str | None]:
    """``{"cpu", "cpu_family", "cpu_model"}`` of the first processor in a ``/proc/cpuinfo`` text.

    On a VM the model name can be the vendor's alone ("AMD EPYC"); family and model tell hosts apart.
    """
    info: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return {"cpu": info.get("model name"), "cpu_family": info.get("cpu family"), "cpu_model": info.get("model")}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    from datamodules.base import usable_cores
    from lightning_modules.precision import cpu_has_amx, cpu_has_native_bf16

    cores = usable_cores()
    try:
        identity = cpu_identity(Path("/proc/cpuinfo").read_text())
    except OSError:
        identity = {"cpu": None, "cpu_family": None, "cpu_model": None}
    identity["cpu"] = identity["cpu"] or platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        **identity, "cores": cores, "torch_threads": torch.get_num_threads(), "load_avg_1min": load,
        "isa": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_native_bf16(), "amx": cpu_has_amx(),
        "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


# ---------------------------------------------------------------------- PEFT configs
def peft_configs() -> dict[str, dict[str, Any]]:
    """``configs/peft/<name>.yaml`` -> its ``{class_path, init_args}``, by file stem."""
    out = {}
    for path in sorted(PEFT_CONFIGS.glob("*.yaml")):
        spec = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("init_args", {}).get("peft")
        if isinstance(spec, dict) and "class_path" in spec:
            out[path.stem] = spec
    return out


def method(name: str) -> PeftMethod:
    """The PeftMethod of ``configs/peft/<name>.yaml``."""
    return build_method(peft_configs()[name])


# ---------------------------------------------------------------------- models and steps
def constant_lr(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def classifier(backbone: str, peft: PeftMethod, seed: int = 0, **kwargs: Any) -> Any:
    """ImageClassifier as a run builds it (random weights: no network), attention chosen for CPU at ``precision()``."""
    from lightning_modules import ImageClassifier

    torch.manual_seed(seed)
    kwargs.setdefault("lr_scheduler", constant_lr)
    module = ImageClassifier(
        backbone=backbone, peft=peft, num_classes=NUM_CLASSES, pretrained=False,
        image_size=IMAGE_SIZE, export_adapter=False, **kwargs,
    )
    module.select_attention("cpu", precision())
    return module


def batch(seed: int = 0, size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed uint8 image batch and labels, as the datamodules deliver them."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 3, IMAGE_SIZE, IMAGE_SIZE), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, NUM_CLASSES, (size,), generator=g)


class ClassifierStep:
    """One ImageClassifier training step: forward + loss (under ``autocast()``), backward, optimizer, scheduler."""

    def __init__(self, module: Any, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.module, self.images, self.labels = module, images, labels
        conf = module.configure_optimizers()
        self.optimizer = conf["optimizer"]
        self.scheduler = conf["lr_scheduler"]["scheduler"]
        module.train()

    def __call__(self) -> None:
        with autocast():
            loss = F.cross_entropy(self.module(self.images).float(), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


class PlainStep:
    """The same step for a plain model on a float batch (a hand-written training script)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 labels: torch.Tensor) -> None:
        self.model, self.optimizer, self.x, self.labels = model, optimizer, x, labels
        model.train()

    def __call__(self) -> None:
        with autocast():
            loss = F.cross_entropy(self.model(self.x).float(), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
