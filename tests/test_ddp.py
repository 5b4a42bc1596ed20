"""DDP end to end: ``run.py fit`` on 2 CPU processes (gloo) for LoRA (and VPT, SSF: slow) on a tiny ViT.

DDP relaunches the script, so each run is a real ``python run.py`` subprocess. The run directory
must look like a single-process run's (same validation metrics, same checkpoint tensors) and be
written once, by rank 0. The val / test sizes are odd, so a padding sampler would evaluate some
samples twice; val's shares differ in batch count too (9 and 8 samples in batches of 8).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
#: LoRA runs in CI; VPT and SSF under DDP are slow checks (``-m slow``): what they add over LoRA's run,
#: a gradient for every trainable tensor each step (find_unused_parameters=False), is checked for
#: every method in tests/test_peft_methods.py.
METHODS = ("lora", pytest.param("vpt_shallow", marks=pytest.mark.slow), pytest.param("ssf", marks=pytest.mark.slow))
TINY_VIT = [
    "--config", str(CONFIGS / "demo.yaml"),
    "--model.init_args.backbone", "vit_tiny_patch16_224",
    "--model.init_args.pretrained", "false",
    "--model.init_args.export_adapter", "false",
    "--data.init_args.image_size", "32",
    "--data.init_args.num_train", "32",
    "--data.init_args.num_val", "17",
    "--data.init_args.num_test", "13",
    "--data.init_args.batch_size", "8",
    "--data.init_args.num_workers", "0",
    "--data.init_args.augment", "false",
    "--trainer.max_epochs", "1",
    "--trainer.precision", "32-true",
    "--trainer.enable_progress_bar", "false",
]


def scalar_tags(version: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in version.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def run_py(stage: str, args: list[str], cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), stage, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    return output


@pytest.mark.parametrize("method", METHODS)
def test_ddp_fit_matches_single_process_layout_and_writes_once(in_tmp: Path, method: str) -> None:
    method_yaml = CONFIGS / "peft" / f"{method}.yaml"
    if not method_yaml.is_file():
        pytest.skip(f"{method_yaml.name} is not written yet")
    args = [*TINY_VIT, "--config", str(method_yaml), "--trainer.logger.init_args.save_dir", str(in_tmp / "runs")]
    ddp = [*args, "--config", str(CONFIGS / "trainer" / "cpu_ddp.yaml"), "--trainer.logger.init_args.name", "ddp"]
    output = run_py("fit", ddp, in_tmp)
    assert "MEMBER: 2/2" in output, "two DDP processes must have joined"
    run.cli_main(["fit", *args, "--trainer.logger.init_args.name", "single"])

    ddp_dirs = list((in_tmp / "runs" / "ddp").iterdir())
    assert [p.name for p in ddp_dirs] == ["version_0"], "rank 1 must not create a run dir of its own"
    ddp_dir, single_dir = ddp_dirs[0], in_tmp / "runs" / "single" / "version_0"
    assert {p.name for p in (ddp_dir / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert len(list(ddp_dir.glob("events.out.tfevents.*"))) == 1
    assert len(list(in_tmp.rglob("fit_summary.json"))) == 2 and (ddp_dir / "config.yaml").is_file()

    ddp_val = {t for t in scalar_tags(ddp_dir) if t.startswith("val/")}
    single_val = {t for t in scalar_tags(single_dir) if t.startswith("val/")}
    assert ddp_val == single_val and {"val/auroc", "val/acc", "val/loss"} <= ddp_val

    ddp_summary = json.loads((ddp_dir / "fit_summary.json").read_text())
    single_summary = json.loads((single_dir / "fit_summary.json").read_text())
    assert ddp_summary.keys() == single_summary.keys()
    assert (ddp_summary["global_steps"], single_summary["global_steps"]) == (2, 4), "each rank sees half the data"
    assert 0.0 <= ddp_summary["best_score"] <= 1.0

    load = lambda d: torch.load(d / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)  # noqa: E731
    ddp_state, single_state = load(ddp_dir)["state_dict"], load(single_dir)["state_dict"]
    assert ddp_state.keys() == single_state.keys()
    assert all(ddp_state[k].shape == single_state[k].shape for k in ddp_state)

    if method != "lora":
        return
    run_py("test", ddp, in_tmp)  # the best checkpoint of this run, tested on both ranks
    run.cli_main(["test", *args, "--trainer.logger.init_args.name", "single"])
    assert [p.name for p in (in_tmp / "runs" / "ddp").iterdir()] == ["version_0"]
    assert len(list((in_tmp / "runs" / "ddp").rglob("metrics.json"))) == 1
    ddp_metrics = json.loads((ddp_dir / "metrics.json").read_text())
    single_metrics = json.loads((single_dir / "metrics.json").read_text())
    assert ddp_metrics.keys() == single_metrics.keys()
    assert ddp_metrics["metrics"].keys() == single_metrics["metrics"].keys() >= {"acc", "auroc", "loss"}
    assert ddp_metrics["trainable_params"] == single_metrics["trainable_params"]

    # The DDP run's checkpoint tested in one process: every test sample counted once on 2 ranks too.
    best = ddp_dir / "checkpoints" / "best.ckpt"
    run.cli_main(["test", *args, "--trainer.logger.init_args.name", "one_process", "--ckpt_path", str(best)])
    reference = json.loads((in_tmp / "runs" / "one_process" / "version_0" / "metrics.json").read_text())["metrics"]
    assert reference.keys() == ddp_metrics["metrics"].keys()
    for key, value in reference.items():
        assert ddp_metrics["metrics"][key] == pytest.approx(value, abs=1e-6), (key, ddp_metrics["metrics"], reference)


def test_ddp_preemption_saves_once_at_the_same_step_and_resumes_exactly(in_tmp: Path) -> None:
    """SIGTERM to the launching process only: both ranks agree, save one last.ckpt, stop; resume is exact."""
    import signal

    from test_reliability import hold_for_signal, preempt

    args = [*TINY_VIT, "--config", str(CONFIGS / "peft" / "lora.yaml"), "--config", str(CONFIGS / "trainer" / "cpu_ddp.yaml"),
            "--data.init_args.num_train", "64", "--trainer.max_epochs", "2",
            "--trainer.logger.init_args.save_dir", str(in_tmp / "runs")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    marker = in_tmp / "holding"
    cmd = [sys.executable, str(ROOT / "run.py"), "fit", *args, "--trainer.logger.init_args.name", "preempted",
           *hold_for_signal(epoch=0, batch=1, marker=marker)]
    code, err = preempt(cmd, in_tmp, marker, signal.SIGTERM, env)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert err.count("Stopped by SIGTERM at epoch 0, batch 2 of 4 (step 2)") == 1, err[-3000:]
    run_dir = in_tmp / "runs" / "preempted" / "version_0"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["SyntheticDataModule"]["train_order"]["batches_done"] == 2
    started = TINY_VIT[TINY_VIT.index("--trainer.precision") + 1]  # what the SIGTERM checkpoint records
    assert ckpt["callbacks"]["RunConfigSaver"] == {"precision_started": started, "precision_trained": started}

    run_py("fit", [*args, "--trainer.logger.init_args.name", "preempted", "--ckpt_path", "last"], in_tmp)
    run_py("fit", [*args, "--trainer.logger.init_args.name", "straight"], in_tmp)
    assert [p.name for p in (in_tmp / "runs" / "preempted").iterdir()] == ["version_0"]
    load = lambda n: torch.load(in_tmp / "runs" / n / "version_0" / "checkpoints" / "last.ckpt",  # noqa: E731
                                map_location="cpu", weights_only=True)
    resumed, straight = load("preempted"), load("straight")
    assert resumed["global_step"] == straight["global_step"] == 8
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
