"""Shared test setup: offline, few threads, tiny models, the optional real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups fail fast instead of retrying for ~45 s
os.environ.setdefault("MPLBACKEND", "Agg")
# run.main() in-process must not retune this process's allocator (tests/test_speedups.py tests it in subprocesses)
os.environ.setdefault("MEDPEFT_CPU_ALLOCATOR", "default")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test models are dominated by per-op overhead: one thread is faster than two, and
# much faster on a loaded machine.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (small real medical datasets); skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Runs the test inside tmp_path so relative run dirs (runs/...) land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
