"""Crash safety: SIGKILL + resume is exact, determinism, NaN guard, atomic saves, unwritable dirs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run
from lightning_modules.checkpoint_io import AtomicCheckpointIO

RUN_PY = str(Path(run.__file__).resolve())
DEMO = str(Path(run.__file__).resolve().parent / "configs" / "demo.yaml")
TINY = [
    "--config", DEMO,
    "--model.init_args.backbone", "resnet18",
    "--model.init_args.pretrained", "false",
    "--data.init_args.image_size", "32",
    "--data.init_args.num_train", "64",
    "--data.init_args.num_val", "16",
    "--data.init_args.num_test", "24",
    "--data.init_args.batch_size", "8",
    "--data.init_args.num_workers", "0",
    "--trainer.enable_progress_bar", "false",
]


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(in_tmp: Path) -> None:
    epochs = ["--trainer.max_epochs", "3"]
    # Same thread count as this process: float reductions (and so bit-exact results) depend on it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, RUN_PY, "fit", *TINY, *epochs, "--trainer.logger.init_args.name", "killed"]
    proc = subprocess.Popen(cmd, cwd=in_tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = in_tmp / "runs/killed/version_0/checkpoints/last.ckpt"
    deadline = time.time() + 240
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(last, weights_only=True)["epoch"]
    assert killed_at < 2
    assert not list(last.parent.glob("*.tmp")), "no partial checkpoint may be left behind"

    run.cli_main(["fit", *TINY, *epochs, "--trainer.logger.init_args.name", "killed", "--ckpt_path", "last"])
    run.cli_main(["fit", *TINY, *epochs, "--trainer.logger.init_args.name", "straight"])
    resumed = state(last)
    straight = state(in_tmp / "runs/straight/version_0/checkpoints/last.ckpt")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    run.cli_main(["test", *TINY, "--trainer.logger.init_args.name", "killed"])
    run.cli_main(["test", *TINY, "--trainer.logger.init_args.name", "straight"])
    metrics = [json.loads((in_tmp / f"runs/{n}/version_0/metrics.json").read_text())["metrics"]
               for n in ("killed", "straight")]
    assert metrics[0] == metrics[1]


TESTS_DIR = str(Path(__file__).resolve().parent)


def hold_for_signal(epoch: int, batch: int, marker: Path) -> list[str]:
    """run.py arguments adding ``signal_helpers.HoldForSignal`` (training waits there for a signal)."""
    spec = {"class_path": "signal_helpers.HoldForSignal",
            "init_args": {"epoch": epoch, "batch": batch, "marker": str(marker)}}
    return [f"--trainer.callbacks+={json.dumps(spec)}"]


def preempt(cmd: list[str], cwd: Path, marker: Path, signum: int, env: dict[str, str]) -> tuple[int, str]:
    """Starts ``cmd``, sends ``signum`` once training holds at the marker's batch; (exit code, stderr)."""
    env = {**env, "PYTHONPATH": os.pathsep.join([TESTS_DIR, env.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.is_file(), "training never reached the batch that waits for the signal"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


# (signal, epoch, batch index where it arrives, where the run stops, global step, batches done in the epoch)
PREEMPTIONS = [
    (signal.SIGTERM, 1, 2, "at epoch 1, batch 3 of 8", 11, 3),
    # On an epoch's last batch the stop waits for that validation (best.ckpt sees it) and the epoch end.
    (signal.SIGUSR1, 0, 7, "at the end of epoch 0", 8, 8),
]


@pytest.mark.parametrize(("signum", "epoch", "batch", "where", "step", "done"), PREEMPTIONS,
                         ids=["SIGTERM-mid-epoch", "SIGUSR1-last-batch"])
def test_preemption_saves_at_a_clean_point_then_resume_equals_an_uninterrupted_run(
    in_tmp: Path, signum: int, epoch: int, batch: int, where: str, step: int, done: int
) -> None:
    # Two loader workers: with workers, Lightning starts the first iterator of a process before it
    # sets the sampler's epoch, so a resume that relied on set_epoch replayed epoch 0's order.
    args = [*TINY, "--trainer.max_epochs", "2", "--data.init_args.num_workers", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    marker = in_tmp / "holding"
    cmd = [sys.executable, RUN_PY, "fit", *args, "--trainer.logger.init_args.name", "preempted",
           *hold_for_signal(epoch=epoch, batch=batch, marker=marker)]
    code, err = preempt(cmd, in_tmp, marker, signum, env)
    name = signal.Signals(signum).name
    assert code == 128 + signum, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"Stopped by {name} {where} (step {step}): saved "), last_line
    assert "--ckpt_path last" in last_line
    run_dir = in_tmp / "runs/preempted/version_0"
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (epoch, step)
    assert ckpt["SyntheticDataModule"]["train_order"] == {
        "epoch": epoch, "batches_done": done, "epoch_batches": 8, "train_size": 64, "batch_size": 8, "world_size": 1}
    assert not (run_dir / "fit_summary.json").exists(), "a pre-empted fit must not look finished"
    assert not list(run_dir.rglob("*.tmp"))

    run.cli_main(["fit", *args, "--trainer.logger.init_args.name", "preempted", "--ckpt_path", "last"])
    run.cli_main(["fit", *args, "--trainer.logger.init_args.name", "straight"])
    for ckpt_name in ("last.ckpt", "best.ckpt"):
        resumed = state(run_dir / "checkpoints" / ckpt_name)
        straight = state(in_tmp / "runs/straight/version_0/checkpoints" / ckpt_name)
        assert resumed.keys() == straight.keys()
        for key in straight:
            assert torch.equal(resumed[key], straight[key]), (ckpt_name, key)
    summaries = [json.loads((in_tmp / f"runs/{n}/version_0/fit_summary.json").read_text())
                 for n in ("preempted", "straight")]
    assert summaries[0]["global_steps"] == summaries[1]["global_steps"] == 16
    assert summaries[0]["best_score"] == summaries[1]["best_score"]


def test_same_config_and_seed_give_identical_metrics(in_tmp: Path) -> None:
    results = []
    for name in ("a", "b"):
        args = [*TINY, "--trainer.max_epochs", "1", "--trainer.logger.init_args.name", name]
        run.cli_main(["fit", *args])
        run.cli_main(["test", *args])
        results.append(json.loads((in_tmp / f"runs/{name}/version_0/metrics.json").read_text()))
    assert results[0]["metrics"] == results[1]["metrics"]
    assert results[0]["fit"]["best_score"] == results[1]["fit"]["best_score"]


def test_ckpt_path_auto_starts_fresh_then_resumes(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    args = [*TINY, "--data.init_args.num_train", "16", "--trainer.logger.init_args.name", "auto"]
    run.cli_main(["fit", *args, "--trainer.max_epochs", "1", "--ckpt_path", "auto"])
    assert "starting a new run" in capsys.readouterr().err
    run.cli_main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "auto"])
    assert "Using last checkpoint of this run" in capsys.readouterr().err
    assert [p.name for p in (in_tmp / "runs/auto").iterdir()] == ["version_0"]
    assert torch.load(in_tmp / "runs/auto/version_0/checkpoints/last.ckpt", weights_only=True)["epoch"] == 1


def test_non_finite_loss_stops_with_one_clear_message(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    code = run.main(["fit", *TINY, "--trainer.max_epochs", "2", "--trainer.precision", "32-true",
                     "--model.init_args.optimizer.init_args.lr", "1e30"])
    assert code == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: Training loss is ") and "learning rate" in last_line
    assert not list(in_tmp.rglob("metrics.json"))


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)

    def dies_half_way(obj: object, f: object, *a: object, **k: object) -> None:
        f.write(b"partial bytes")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_unwritable_output_directory_fails_before_training(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = in_tmp / "not_a_dir"
    blocker.write_text("")
    code = run.main(["fit", *TINY, "--trainer.logger.init_args.save_dir", str(blocker / "runs")])
    assert code == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"error: Output directory {blocker / 'runs'}") and "not writable" in last_line


def test_sigusr1_inside_a_slurm_job_requeues_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from lightning_modules.resume import Preemption

    log = tmp_path / "scontrol.log"
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    rank0 = SimpleNamespace(is_global_zero=True)
    assert not Preemption()._requeue(rank0, signal.SIGTERM), "SIGTERM (scancel) is not requeued by default"
    assert Preemption()._requeue(rank0, signal.SIGUSR1)
    assert not Preemption()._requeue(SimpleNamespace(is_global_zero=False), signal.SIGUSR1), "rank 0 requeues"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert Preemption(requeue=True)._requeue(rank0, signal.SIGTERM)
    assert log.read_text().splitlines() == ["requeue 4242", "requeue 77_3"]
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    assert not Preemption(requeue=True)._requeue(rank0, signal.SIGUSR1), "outside SLURM there is nothing to requeue"
    with pytest.raises(ValueError, match="SIGNOPE"):
        Preemption(signals=["SIGNOPE"])
