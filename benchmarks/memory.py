"""Peak training memory of each PEFT config relative to full fine-tuning.

Each config runs in its own process (``python -m benchmarks.memory <config>``), so allocator caches
and other configs' tensors never count: the baseline is the process's resident set once the model
and optimizer are built, the peak is the highest resident set over a few training steps (Linux's
``VmHWM``, reset at the baseline through ``/proc/self/clear_refs``; a 1 ms RSS sampler elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import ROOT, VIT, ClassifierStep, batch, classifier, method
from lightning_modules.allocator import keep_freed_memory

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakRSS:
    """Highest RSS from ``start()`` on: the kernel's high-water mark when it can be reset, else sampled."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None
        self.method = ""

    def start(self) -> None:
        if _reset_high_water_mark():
            self.method = "VmHWM"
        else:
            self.method = "sampled"
            self._peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, rss_bytes())

    def stop(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            return max(self._peak, rss_bytes())
        return _status_bytes("VmHWM")


def measure(config: str, backbone: str = VIT, steps: int = 3) -> dict[str, Any]:
    """Builds the model, then reports the peak RSS above the baseline over ``steps`` training steps."""
    import gc

    images, labels = batch()
    try:
        module = classifier(backbone, method(config))
    except ValueError as err:  # the method does not support this backbone
        return {"skipped": str(err)}
    step = ClassifierStep(module, images, labels)
    gc.collect()
    peak = PeakRSS()
    baseline = rss_bytes()
    peak.start()
    for _ in range(steps):
        step()
    high = peak.stop()
    return {"baseline_bytes": baseline, "peak_bytes": high, "peak_above_baseline": high - baseline,
            "method": peak.method}


def _reset_high_water_mark() -> bool:
    """Resets this process's VmHWM to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def in_subprocess(config: str, backbone: str, steps: int, threads: int) -> dict[str, Any]:
    """``measure`` in a fresh Python process."""
    cmd = [sys.executable, "-m", "benchmarks.memory", config, "--backbone", backbone, "--steps", str(steps),
           "--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"memory benchmark of {config} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_mem_ratios(names: tuple[str, ...], steps: int, threads: int, backbone: str = VIT) -> tuple[dict[str, float], dict[str, Any]]:
    """``{config: peak above baseline / full fine-tuning's}`` (each config in its own process).

    Two processes run at once when the kernel's high-water mark can be reset (``VmHWM``: a peak that
    no sampling can miss, so it does not depend on speed) and the cores hold both processes' threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    from datamodules.base import usable_cores

    configs = ("full", *[n for n in names if n != "full"])
    workers = 2 if _reset_high_water_mark() and usable_cores() >= 2 * threads else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = pool.map(lambda name: in_subprocess(name, backbone, steps, threads), configs)
        raw = dict(zip(configs, done, strict=True))
    skipped = {n: r["skipped"] for n, r in raw.items() if "skipped" in r}
    raw = {n: r for n, r in raw.items() if n not in skipped}
    ref = raw["full"]["peak_above_baseline"]
    ratios = {n: round(r["peak_above_baseline"] / ref, 3) for n, r in raw.items() if n != "full"}
    details = {"peak_above_baseline_mb": {n: round(r["peak_above_baseline"] / 2**20, 1) for n, r in raw.items()},
               "baseline_mb": {n: round(r["baseline_bytes"] / 2**20, 1) for n, r in raw.items()},
               "how": raw["full"]["method"], "steps": steps, "skipped": skipped}
    return ratios, details


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Peak training memory of one PEFT config (prints JSON).")
    parser.add_argument("config", help="configs/peft/<config>.yaml")
    parser.add_argument("--backbone", default=VIT)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as run.py does
    print(json.dumps(measure(args.config, args.backbone, args.steps)))


if __name__ == "__main__":
    main()
