"""sweep.py: grid expansion, names, validation before any run, resumable execution, tuning, report."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import sweep
from lightning_modules.sweeps import executors
from lightning_modules.sweeps.grid import load_sweep
from lightning_modules.sweeps.plan import final_runs, inside
from lightning_modules.sweeps.report import write_report

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model.init_args.backbone": "resnet18",
    "model.init_args.pretrained": False,
    "model.init_args.export_adapter": False,
    "data.init_args.image_size": 32,
    "data.init_args.num_train": 32,
    "data.init_args.num_val": 16,
    "data.init_args.num_test": 16,
    "data.init_args.batch_size": 16,
    "data.init_args.num_workers": 0,
    "trainer.max_epochs": 1,
    "trainer.precision": "32-true",
    "trainer.logger.init_args.name": "ignored",
}
LR = "model.init_args.optimizer.init_args.lr"


def write_sweep(tmp: Path, grid: dict[str, Any], **extra: Any) -> Path:
    spec = {"configs": ["configs/demo.yaml"], "overrides": dict(TINY), "grid": grid, **extra}
    spec["overrides"].pop("trainer.logger.init_args.name")
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def arg(command: list[str], key: str) -> str | None:
    return command[command.index(key) + 1] if key in command else None


class FakeRunPy:
    """Stands in for the ``run.py`` subprocesses: writes what a finished fit / test writes."""

    def __init__(self, val: Callable[[list[str]], float] = lambda c: 0.5,
                 test: Callable[[list[str]], float] = lambda c: 0.5, fail: Callable[[list[str]], bool] = lambda c: False):
        self.val, self.test, self.fail = val, test, fail
        self.calls: list[list[str]] = []

    def __call__(self, command: list[str], log: Any, cwd: str, env: dict[str, str]) -> int:
        self.calls.append(command)
        stage = command[2]
        version = Path(arg(command, "--trainer.logger.init_args.save_dir")) / arg(
            command, "--trainer.logger.init_args.name") / "version_0"
        if self.fail(command):
            log.write("Traceback (most recent call last):\nerror: the fake run failed.\n")
            return 1
        version.mkdir(parents=True, exist_ok=True)
        if stage == "fit":
            (version / "checkpoints").mkdir(exist_ok=True)
            (version / "checkpoints" / "best.ckpt").write_bytes(b"x")
            (version / "fit_summary.json").write_text(json.dumps({"best_score": self.val(command), "wall_time_s": 1.0}))
        else:
            metrics = {"metrics": {"auroc": self.test(command), "acc": 0.5}, "trainable_params": 10,
                       "total_params": 1000, "trainable_pct": 1.0, "test_wall_time_s": 0.1, "peak_memory_mb": 5.0}
            (version / "metrics.json").write_text(json.dumps(metrics))
        return 0

    def stages(self) -> list[tuple[str, str]]:
        return [(c[2], arg(c, "--trainer.logger.init_args.name")) for c in self.calls]


def no_subprocess(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("no run may start")


# ---------------------------------------------------------------------------------------- grid
def test_grid_expands_in_order_applies_excludes_and_names_runs(in_tmp: Path) -> None:
    path = write_sweep(in_tmp, {
        "method": ["configs/peft/bitfit.yaml", "configs/peft/lora.yaml", "configs/peft/vpt_shallow.yaml"],
        "data.init_args.train_fraction": [0.1, 1.0],
        "seed_everything": [0, 1, 2],
    }, exclude=[{"method": "vpt_shallow"}, {"method": "configs/peft/lora.yaml", "data.init_args.train_fraction": 0.1}])
    spec = load_sweep(path)
    runs = final_runs(spec)
    assert len(runs) == 3 * 2 * 3 - 6 - 3
    assert runs[0].name == "bitfit__train_fraction=0.1__seed=0"
    assert [r.name for r in runs[-3:]] == [f"lora__train_fraction=1__seed={s}" for s in range(3)]
    assert runs[0].labels == {"method": "bitfit", "train_fraction": "0.1", "seed": "0"}
    args = runs[0].args()
    assert args[:4] == ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/peft/bitfit.yaml")]
    assert args[args.index("--data.init_args.train_fraction") + 1] == "0.1"
    assert args[-6:] == ["--trainer.logger.init_args.save_dir", str(in_tmp / "sweeps/sweep/runs"),
                         "--trainer.logger.init_args.name", runs[0].name, "--trainer.logger.init_args.version", "0"]
    assert len({r.name for r in runs}) == len(runs)


def test_run_names_never_leave_the_sweep_directory(in_tmp: Path) -> None:
    (in_tmp / "a").mkdir()
    (in_tmp / "a" / "x.yaml").write_text("{}\n")
    (in_tmp / "x.yaml").write_text("{}\n")
    path = write_sweep(in_tmp, {
        "extra": ["a/x.yaml", "x.yaml"],
        "data.init_args.root": ["../../etc", "/abs/path", "..", ".hidden", "a/b", "a_b", "x" * 300],
    })
    spec = load_sweep(path, out=in_tmp / "out")
    runs = final_runs(spec)
    assert len({r.name for r in runs}) == len(runs) == 14
    for run in runs:
        assert "/" not in run.name and ".." not in run.name and not run.name.startswith(".")
        assert len(run.name) <= 120 and inside(run.run_dir, in_tmp / "out")
    names = [r.name for r in runs]
    assert names[0].startswith("a-x__root=") and names[7].startswith("x__root=")
    assert sum(n.startswith("a-x__root=a_b-") for n in names) == 2, "a/b and a_b differ: hashed apart"


# ---------------------------------------------------------------------------------------- checks
def test_dry_run_lists_runs_and_writes_nothing(in_tmp: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executors, "run_stage", no_subprocess)
    path = write_sweep(in_tmp, {"method": ["configs/peft/bitfit.yaml", "configs/peft/lora.yaml"],
                                "seed_everything": [0, 1]})
    before = sorted(in_tmp.rglob("*"))
    assert sweep.main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "runs (4)" in out and "lora__seed=1" in out and "--seed_everything 1" in out
    assert sorted(in_tmp.rglob("*")) == before


@pytest.mark.parametrize(
    ("grid", "extra", "message"),
    [
        ({"data.init_args.bogus": [1, 2]}, {}, "run 'bogus=1' of the sweep is rejected by run.py: .*Option 'bogus' is not accepted"),
        ({"data.init_args.train_fraction": ["half"]}, {}, "train_fraction.*Expected a <class 'float'>"),
        ({"method": ["configs/peft/nope.yaml"]}, {}, "config file 'configs/peft/nope.yaml' does not exist"),
        ({}, {}, "the grid is empty"),
        ({"seed_everything": []}, {}, "must be a non-empty list"),
        ({"method": ["configs/peft/bitfit.yaml"]}, {"exclude": [{"method": "bitfit"}]}, "remove every run"),
        ({"method": ["configs/peft/bitfit.yaml"]}, {"exclude": [{"method": "lora"}]}, "'lora' is not a value of axis"),
        ({"seed_everything": [0]}, {"tune": {"axis": LR, "values": [0.1], "metric": "val/loss"}},
         "checkpoint is chosen on val/auroc"),
        ({"seed_everything": [0]}, {"colour": "red"}, "unknown key"),
        ({"lr": [0.1]}, {}, "dotted run.py option"),
    ],
)
def test_bad_sweep_input_fails_before_any_run(in_tmp: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch, grid: dict, extra: dict,
                                              message: str) -> None:
    import re

    monkeypatch.setattr(executors, "run_stage", no_subprocess)
    path = write_sweep(in_tmp, grid, **extra)
    assert sweep.main(["run", str(path), "--out", str(in_tmp / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), last
    assert not (in_tmp / "out").exists()


def test_slurm_executor_without_sbatch_is_a_clear_error(in_tmp: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(in_tmp))
    path = write_sweep(in_tmp, {"seed_everything": [0]})
    assert sweep.main(["run", str(path), "--executor", "slurm", "--out", str(in_tmp / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --executor slurm needs SLURM's sbatch and srun")
    assert not (in_tmp / "out").exists()


def test_slurm_parameters_become_a_multi_node_job_with_one_task_per_gpu(in_tmp: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("submitit")
    for tool in ("sbatch", "srun"):  # stand-ins: submitit only checks they exist before submitting
        (in_tmp / tool).write_text("#!/bin/sh\nexit 1\n")
        (in_tmp / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{in_tmp}{os.pathsep}{os.environ['PATH']}")
    path = write_sweep(in_tmp, {"seed_everything": [0]}, slurm={"partition": "gpu", "account": "lab", "time_min": 60})
    spec = load_sweep(path)
    args = sweep.build_parser().parse_args(["run", str(path), "--executor", "slurm", "--gpus-per-node", "4",
                                            "--nodes", "2"])
    executor = sweep.make_executor(args, spec, max_parallel=8)
    text = executor.make()._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--account=lab",
                 "--time=60", f"export PYTHONPATH={ROOT}"):
        assert line in text, line
    run_args = final_runs(spec)[0].args()
    assert run_args[run_args.index("--trainer.devices") + 1] == "4"
    assert run_args[run_args.index("--trainer.num_nodes") + 1] == "2"


def test_paper_grids_pair_methods_only_with_backbones_they_support(tmp_path: Path) -> None:
    import timm

    from lightning_modules.sweeps.plan import group_of, tune_runs
    from peft_methods.base import build_method
    from peft_methods.report import read_peft_spec

    spec = load_sweep(ROOT / "configs/sweeps/paper_classification.yaml", out=tmp_path)
    points = spec.points()
    assert len(points) == 5 * (23 + 13) * 4 * 3
    assert len(tune_runs(spec)) == 5 * (23 + 13) * 4 * 4
    assert len(final_runs(spec, {group_of(spec, p): 1e-3 for p in points})) == len(points)
    stand_ins = {"vit_b16_in21k": lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3),
                 "resnet50": lambda: timm.create_model("resnet18", num_classes=3)}
    pairs = {(Path(p["backbone"]).stem, p["method"]) for p in points}
    assert len(pairs) == 36
    for backbone, method in sorted(pairs):
        reason = build_method(read_peft_spec(Path(method))).unsupported_reason(stand_ins[backbone]())
        assert reason is None, f"{Path(method).stem} on {backbone}: {reason}"
    t2i = load_sweep(ROOT / "configs/sweeps/paper_t2i.yaml", out=tmp_path)
    assert len(t2i.points()) == 8 * 3


# ---------------------------------------------------------------------------------------- execution
def test_finished_runs_are_skipped_partial_runs_resume_and_force_reruns(in_tmp: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_sweep(in_tmp, {"seed_everything": [0, 1]})
    broken = FakeRunPy(fail=lambda c: c[2] == "test" and arg(c, "--seed_everything") == "1")
    monkeypatch.setattr(executors, "run_stage", broken)
    assert sweep.main(["run", str(path)]) == 1
    state = json.loads((in_tmp / "sweeps/sweep/sweep_state.json").read_text())["runs"]
    assert state["final/seed=0"]["status"] == "done"
    assert state["final/seed=1"]["status"] == "failed"
    assert state["final/seed=1"]["error"] == "test: the fake run failed."

    fixed = FakeRunPy()
    monkeypatch.setattr(executors, "run_stage", fixed)
    assert sweep.main(["run", str(path)]) == 0
    assert fixed.stages() == [("test", "seed=1")], "the finished fit of the failed run is kept; only test reruns"

    monkeypatch.setattr(executors, "run_stage", no_subprocess)
    done = in_tmp / "sweeps/sweep/runs/seed=0/version_0/metrics.json"
    stamp = done.stat().st_mtime_ns
    assert sweep.main(["run", str(path)]) == 0
    assert done.stat().st_mtime_ns == stamp

    again = FakeRunPy()
    monkeypatch.setattr(executors, "run_stage", again)
    assert sweep.main(["run", str(path), "--force"]) == 0
    assert sorted(again.stages()) == [("fit", "seed=0"), ("fit", "seed=1"), ("test", "seed=0"), ("test", "seed=1")]


def test_a_preempted_run_resumes_from_its_last_checkpoint(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_sweep(in_tmp, {"seed_everything": [0, 1]})
    finished = FakeRunPy()

    def preempted_seed_1(command: list[str], log: Any, cwd: str, env: dict[str, str]) -> int:
        if command[2] != "fit" or arg(command, "--seed_everything") != "1":
            return finished(command, log, cwd, env)
        version = Path(arg(command, "--trainer.logger.init_args.save_dir")) / "seed=1" / "version_0"
        (version / "checkpoints").mkdir(parents=True)
        (version / "checkpoints" / "last.ckpt").write_bytes(b"x")
        log.write("Stopped by SIGTERM at epoch 1, batch 3 of 8 (step 11): saved ...\n")
        return 143

    monkeypatch.setattr(executors, "run_stage", preempted_seed_1)
    assert sweep.main(["run", str(path)]) == 1
    state = json.loads((in_tmp / "sweeps/sweep/sweep_state.json").read_text())["runs"]
    assert state["final/seed=1"]["status"] == "failed" and "Stopped by SIGTERM" in state["final/seed=1"]["error"]

    resumed = FakeRunPy()
    monkeypatch.setattr(executors, "run_stage", resumed)
    assert sweep.main(["run", str(path)]) == 0
    assert resumed.stages() == [("fit", "seed=1"), ("test", "seed=1")], "only the stopped run continues"
    assert resumed.calls[0][-2:] == ["--ckpt_path", "last"], "its fit resumes instead of starting over"
    assert resumed.calls[1][-2:] != ["--ckpt_path", "last"]

    again = FakeRunPy()  # --force starts every run afresh, checkpoint or not
    monkeypatch.setattr(executors, "run_stage", again)
    (in_tmp / "sweeps/sweep/runs/seed=1/version_0/checkpoints/last.ckpt").write_bytes(b"x")
    assert sweep.main(["run", str(path), "--force"]) == 0
    assert all("--ckpt_path" not in c for c in again.calls)


def test_a_crashed_sweep_leaves_finished_runs_reportable_and_skipped(in_tmp: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_sweep(in_tmp, {"seed_everything": [0, 1]})
    monkeypatch.setattr(executors, "run_stage", FakeRunPy())
    assert sweep.main(["run", str(path)]) == 0
    out = in_tmp / "sweeps/sweep"
    state_file = out / "sweep_state.json"
    state = json.loads(state_file.read_text())
    for entry in state["runs"].values():  # killed after the runs ended, before recording it
        entry["status"] = "running"
    state_file.write_text(json.dumps(state))
    (out / "results.csv").unlink()
    assert sweep.main(["report", str(out)]) == 0
    assert sum(",done," in line for line in (out / "results.csv").read_text().splitlines()) == 2
    monkeypatch.setattr(executors, "run_stage", no_subprocess)
    assert sweep.main(["run", str(path)]) == 0
    assert {e["status"] for e in json.loads(state_file.read_text())["runs"].values()} == {"done"}


def test_runs_finished_with_other_settings_are_kept_but_left_out_of_the_tables(
        in_tmp: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import csv

    path = write_sweep(in_tmp, {"seed_everything": [0, 1]})
    monkeypatch.setattr(executors, "run_stage", FakeRunPy(test=lambda c: 0.5))
    assert sweep.main(["run", str(path)]) == 0
    spec = yaml.safe_load(path.read_text())
    spec["overrides"]["trainer.max_epochs"] = 30
    spec["grid"]["seed_everything"] = [0, 1, 2]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    longer = FakeRunPy(test=lambda c: 0.9)
    monkeypatch.setattr(executors, "run_stage", longer)
    capsys.readouterr()
    assert sweep.main(["run", str(path)]) == 0
    assert longer.stages() == [("fit", "seed=2"), ("test", "seed=2")], "finished runs are not rerun without --force"
    captured = capsys.readouterr()
    assert "runs: 2 of 3 runs already finished (2 with other settings, not rerun without --force), 1 to run" in captured.out
    assert "  seed=0: finished with other settings; kept but left out of the report" in captured.err
    out = in_tmp / "sweeps/sweep"
    state = json.loads((out / "sweep_state.json").read_text())["runs"]
    assert {k: e["status"] for k, e in state.items()} == {"final/seed=0": "stale", "final/seed=1": "stale",
                                                            "final/seed=2": "done"}
    assert [(r["name"], r["status"], r["auroc"]) for r in csv.DictReader(open(out / "results.csv"))] == [
        ("seed=0", "stale", "0.5"), ("seed=1", "stale", "0.5"), ("seed=2", "done", "0.9")]
    md = (out / "results.md").read_text()
    assert ("Test-split metrics, mean ± std over 3 seeds; checkpoints and tuned values chosen on validation. "
            "1 runs finished, 0 failed. 2 runs finished with other settings than the sweep's current ones and are "
            f"left out of the tables and the tuning selection; `python sweep.py run {path} --force` reruns them."
            ) in md.splitlines()
    assert "| all | 0.900 (1 of 3) |" in md.splitlines()

    monkeypatch.setattr(executors, "run_stage", FakeRunPy(test=lambda c: 0.9))
    assert sweep.main(["run", str(path), "--force"]) == 0
    md = (out / "results.md").read_text()
    assert "| all | **0.900 ± 0.000** |" in md.splitlines() and "other settings" not in md
    assert {e["status"] for e in json.loads((out / "sweep_state.json").read_text())["runs"].values()} == {"done"}


def test_two_sweep_processes_cannot_share_an_output_directory(in_tmp: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    monkeypatch.setattr(executors, "run_stage", no_subprocess)
    path = write_sweep(in_tmp, {"seed_everything": [0]})
    (in_tmp / "out").mkdir()
    with open(in_tmp / "out" / ".sweep.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sweep.main(["run", str(path), "--out", str(in_tmp / "out")]) == 2
    assert "another 'sweep.py run' is using" in capsys.readouterr().err
    assert sorted(p.name for p in (in_tmp / "out").iterdir()) == [".sweep.lock"]


def test_tuning_selects_on_validation_never_on_test(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # lr 0.1: best validation, worst test; lr 0.3: worst validation, best test.
    val = {"0.1": 0.9, "0.2": 0.6, "0.3": 0.1}
    test = {"0.1": 0.2, "0.2": 0.5, "0.3": 0.99}
    fake = FakeRunPy(val=lambda c: val[arg(c, f"--{LR}")], test=lambda c: test[arg(c, f"--{LR}")])
    monkeypatch.setattr(executors, "run_stage", fake)
    path = write_sweep(in_tmp, {"method": ["configs/peft/bitfit.yaml"], "seed_everything": [0, 1]},
                       tune={"axis": LR, "values": [0.3, 0.2, 0.1], "seeds": [5]})
    assert sweep.main(["run", str(path)]) == 0
    out = in_tmp / "sweeps/sweep"
    selection = json.loads((out / "selection.json").read_text())
    assert selection["metric"] == "val/auroc" and selection["mode"] == "max"
    assert selection["groups"]["bitfit"]["selected"] == 0.1
    assert selection["groups"]["bitfit"]["scores"]["0.3"] == {"mean": 0.1, "seeds": {"5": 0.1}}
    tune_calls = [c for c in fake.calls if "/tune" in arg(c, "--trainer.logger.init_args.save_dir")]
    assert {c[2] for c in tune_calls} == {"fit"} and len(tune_calls) == 3, "tuning runs never test"
    assert {arg(c, "--seed_everything") for c in tune_calls} == {"5"}
    finals = sorted(p.parents[1].name for p in (out / "runs").glob("*/version_0/metrics.json"))
    assert finals == ["bitfit__seed=0__lr=0.1", "bitfit__seed=1__lr=0.1"]
    assert "| bitfit | **0.200 ± 0.000** |" in (out / "results.md").read_text()


def diverged_fit(last_score: float) -> Callable[[list[str], Any], int]:
    """A fit that saved a ``last.ckpt`` (with a checkpoint-callback score) and then stopped on a nan loss."""
    import torch

    def run(command: list[str], log: Any) -> int:
        version = Path(arg(command, "--trainer.logger.init_args.save_dir")) / arg(
            command, "--trainer.logger.init_args.name") / "version_0"
        (version / "checkpoints").mkdir(parents=True, exist_ok=True)
        callbacks = {"ModelCheckpoint{'monitor': 'val/auroc', 'mode': 'max'}": {"best_model_score": torch.tensor(last_score)}}
        torch.save({"callbacks": callbacks}, version / "checkpoints" / "last.ckpt")
        log.write("Traceback (most recent call last):\nFloatingPointError: Training loss is nan at step 7\n")
        return 1

    return run


def test_tuning_never_takes_the_score_of_a_failed_run(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    finished = FakeRunPy(val=lambda c: 0.85)
    diverged = diverged_fit(0.91)

    def fake(command: list[str], log: Any, cwd: str, env: dict[str, str]) -> int:
        if arg(command, f"--{LR}") == "0.01":
            return diverged(command, log)
        return finished(command, log, cwd, env)

    monkeypatch.setattr(executors, "run_stage", fake)
    path = write_sweep(in_tmp, {"method": ["configs/peft/bitfit.yaml"], "seed_everything": [0]},
                       tune={"axis": LR, "values": [0.01, 0.001], "seeds": [0]})
    assert sweep.main(["run", str(path)]) == 1, "the failed tuning run is reported"
    out = in_tmp / "sweeps/sweep"
    group = json.loads((out / "selection.json").read_text())["groups"]["bitfit"]
    assert group["selected"] == 0.001
    assert group["scores"] == {"0.01": {"mean": None, "seeds": {}}, "0.001": {"mean": 0.85, "seeds": {"0": 0.85}}}
    assert group["excluded"] == {
        "0.01": ["bitfit__lr=0.01__seed=0 failed: fit: FloatingPointError: Training loss is nan at step 7"]}
    assert [p.parents[1].name for p in (out / "runs").glob("*/version_0/metrics.json")] == ["bitfit__seed=0__lr=0.001"]


def test_a_tuned_value_with_any_unfinished_seed_or_nan_score_is_not_selectable(
        in_tmp: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # bitfit: lr 0.1 has the best seed (0.99) but its seed 1 failed; lr 0.01 finished with a nan score.
    # lora: every value has a failed seed, so it gets no selection and no final runs.
    val = {("bitfit", "0.1", "0"): 0.99, ("bitfit", "0.01", "0"): 0.95, ("bitfit", "0.01", "1"): float("nan"),
           ("bitfit", "0.001", "0"): 0.7, ("bitfit", "0.001", "1"): 0.8, ("lora", "0.1", "0"): 0.9,
           ("lora", "0.01", "1"): 0.9, ("lora", "0.001", "0"): 0.9}

    def key(c: list[str]) -> tuple[str, str, str]:
        return "lora" if "lora.yaml" in " ".join(c) else "bitfit", arg(c, f"--{LR}"), arg(c, "--seed_everything")

    fake = FakeRunPy(val=lambda c: val[key(c)],
                     fail=lambda c: c[2] == "fit" and "/tune/" in arg(c, "--trainer.logger.init_args.save_dir") + "/"
                     and key(c) not in val)
    monkeypatch.setattr(executors, "run_stage", fake)
    path = write_sweep(in_tmp, {"method": ["configs/peft/bitfit.yaml", "configs/peft/lora.yaml"],
                                "seed_everything": [0]},
                       tune={"axis": LR, "values": [0.1, 0.01, 0.001], "seeds": [0, 1]})
    assert sweep.main(["run", str(path)]) == 1
    out = in_tmp / "sweeps/sweep"
    groups = json.loads((out / "selection.json").read_text())["groups"]
    bitfit = groups["bitfit"]
    assert bitfit["selected"] == 0.001
    assert bitfit["scores"]["0.1"] == {"mean": None, "seeds": {"0": 0.99}}
    assert bitfit["scores"]["0.001"] == {"mean": 0.75, "seeds": {"0": 0.7, "1": 0.8}}
    assert bitfit["excluded"] == {
        "0.1": ["bitfit__lr=0.1__seed=1 failed: fit: the fake run failed."],
        "0.01": ["bitfit__lr=0.01__seed=1 finished without a finite validation score (best_score: nan)"]}
    lora = groups["lora"]
    assert "selected" not in lora and sorted(lora["excluded"]) == ["0.001", "0.01", "0.1"]
    assert lora["excluded"]["0.01"] == ["lora__lr=0.01__seed=0 failed: fit: the fake run failed."]
    printed = capsys.readouterr().out
    assert "  group lora: no tuned value has all its tuning runs finished (lora__lr=0.1__seed=1 failed: fit: the " \
           "fake run failed.; lora__lr=0.01__seed=0 failed" in printed and "its final runs are skipped" in printed
    assert [p.parents[1].name for p in (out / "runs").glob("*/version_0/metrics.json")] == ["bitfit__seed=0__lr=0.001"]
    assert "| lora | none (no tuned value has all its tuning runs finished) |" in (out / "results.md").read_text()


def test_a_tuning_run_finished_with_other_settings_is_not_selected(in_tmp: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    val = {"0.01": 0.9, "0.001": 0.8}
    monkeypatch.setattr(executors, "run_stage", FakeRunPy(val=lambda c: val[arg(c, f"--{LR}")]))
    path = write_sweep(in_tmp, {"seed_everything": [0]}, tune={"axis": LR, "values": [0.01, 0.001], "seeds": [0]})
    assert sweep.main(["run", str(path)]) == 0
    out = in_tmp / "sweeps/sweep"
    assert json.loads((out / "selection.json").read_text())["groups"]["all"]["selected"] == 0.01
    state_file = out / "sweep_state.json"
    state = json.loads(state_file.read_text())
    state["runs"]["tune/lr=0.01__seed=0"]["fingerprint"] = "0" * 16  # as if run before a settings change
    state_file.write_text(json.dumps(state))

    again = FakeRunPy()
    monkeypatch.setattr(executors, "run_stage", again)
    assert sweep.main(["run", str(path)]) == 0
    assert again.stages() == [("fit", "seed=0__lr=0.001"), ("test", "seed=0__lr=0.001")], "the stale run is kept"
    group = json.loads((out / "selection.json").read_text())["groups"]["all"]
    assert group["selected"] == 0.001
    assert group["excluded"] == {"0.01": ["lr=0.01__seed=0 finished with other settings (--force reruns it)"]}
    assert json.loads(state_file.read_text())["runs"]["tune/lr=0.01__seed=0"]["status"] == "stale"
    assert "1 runs (0 final, 1 tuning) finished with other settings" in (out / "results.md").read_text()


# ---------------------------------------------------------------------------------------- report
def test_report_tables_csv_and_plots(tmp_path: Path) -> None:
    runs = {}
    scores = {("bitfit", "0.1"): [0.8, 0.9], ("bitfit", "1"): [0.9, 0.92],
              ("lora", "0.1"): [0.7, 0.7], ("lora", "1"): [0.95, 0.97]}
    for (method, frac), values in scores.items():
        for seed, auroc in enumerate(values):
            name = f"{method}__train_fraction={frac}__seed={seed}"
            version = tmp_path / "runs" / name / "version_0"
            version.mkdir(parents=True)
            (version / "metrics.json").write_text(json.dumps({
                "metrics": {"auroc": auroc, "acc": auroc - 0.1}, "trainable_params": 10 if method == "bitfit" else 100,
                "total_params": 1000, "trainable_pct": 1.0 if method == "bitfit" else 10.0, "test_wall_time_s": 1.0,
                "peak_memory_mb": 50.0, "fit": {"wall_time_s": 9.0, "peak_memory_mb": 70.0, "best_score": 0.5}}))
            runs[f"final/{name}"] = {"stage": "final", "name": name, "status": "done", "dir": str(version.parent),
                                     "labels": {"method": method, "train_fraction": frac, "seed": str(seed)}}
    runs["final/broken"] = {"stage": "final", "name": "broken", "status": "failed", "error": "boom",
                            "dir": str(tmp_path / "runs/broken"), "labels": {"method": "lora", "train_fraction": "1", "seed": "2"}}
    (tmp_path / "sweep_state.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "t", "axes": [
        {"key": "method", "label": "method", "is_config": True},
        {"key": "data.init_args.train_fraction", "label": "train_fraction", "is_config": False},
        {"key": "seed_everything", "label": "seed", "is_config": False}]}))
    files = write_report(tmp_path)
    assert {f.name for f in files} == {"results.csv", "results.md", "plot_auroc_vs_train_fraction.png",
                                       "plot_auroc_vs_trainable_pct.png"}
    assert all(f.stat().st_size > 1000 for f in files if f.suffix == ".png")
    md = (tmp_path / "results.md").read_text()
    assert "| method | 0.1 | 1 |" in md
    assert "| bitfit | **0.850 ± 0.071** | **0.910 ± 0.014** |" in md
    assert "| lora | 0.700 ± 0.000 | 0.960 ± 0.014 (2 of 3) |" in md, "its third seed failed: not ranked"
    assert "8 runs finished, 1 failed" in md
    import csv

    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 9 and rows[-1]["status"] == "failed" and rows[-1]["error"] == "boom"
    assert rows[0]["peak_memory_mb"] == "70.0" and rows[0]["fit_wall_time_s"] == "9.0"


def test_report_marks_cells_with_missing_or_non_finite_runs_and_never_ranks_them(tmp_path: Path) -> None:
    runs = {}
    results = {"bitfit": [0.80, 0.82, 0.84], "lora": [0.95, None, None], "ssf": [0.9, float("nan"), 0.9]}
    for method, values in results.items():
        for seed, auroc in enumerate(values):
            name = f"{method}__seed={seed}"
            version = tmp_path / "runs" / name / "version_0"
            version.mkdir(parents=True)
            entry = {"stage": "final", "name": name, "status": "done", "dir": str(version.parent),
                     "labels": {"method": method, "seed": str(seed)}}
            if auroc is None:
                entry.update(status="failed", error="fit: FloatingPointError: Training loss is nan")
            else:
                (version / "metrics.json").write_text(json.dumps({"metrics": {"auroc": auroc}}))
            runs[f"final/{name}"] = entry
    (tmp_path / "sweep_state.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "t", "axes": [
        {"key": "method", "label": "method", "is_config": True},
        {"key": "seed_everything", "label": "seed", "is_config": False}]}))
    write_report(tmp_path)
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[2] == ("Test-split metrics, mean ± std over 3 seeds; checkpoints and tuned values chosen on "
                        "validation. 7 runs finished, 2 failed.")
    assert lines[4:10] == ["## auroc (higher is better)", "", "| method | auroc |", "|---|---:|",
                           "| bitfit | **0.820 ± 0.020** |", "| lora | 0.950 (1 of 3) |"]
    assert lines[10] == "| ssf | 0.900 ± 0.000 (2 of 3) |", "a nan counts as missing, not as a smaller sample"
    assert "averages the k finite values of its n planned runs and is not ranked" in lines[-1]


# ---------------------------------------------------------------------------------------- real runs
def test_local_sweep_end_to_end_with_a_failing_point_then_retried(in_tmp: Path, capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (in_tmp / "ok.yaml").write_text("data:\n  init_args:\n    train_fraction: 0.5\n")
    (in_tmp / "bad.yaml").write_text("data:\n  init_args:\n    train_fraction: 1.5\n")
    path = write_sweep(in_tmp, {"variant": ["ok.yaml", "bad.yaml"], "seed_everything": [3]})
    assert sweep.main(["run", str(path), "--max-parallel", "2"]) == 1
    out = in_tmp / "sweeps/sweep"
    state = json.loads((out / "sweep_state.json").read_text())["runs"]
    assert state["final/ok__seed=3"]["status"] == "done"
    assert state["final/bad__seed=3"]["status"] == "failed"
    assert "train_fraction" in state["final/bad__seed=3"]["error"]
    assert "error:" in (out / "runs/bad__seed=3/log.txt").read_text()
    ok = out / "runs/ok__seed=3/version_0"
    assert {p.name for p in (ok / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert (ok / "config.yaml").is_file() and list(ok.glob("events.out.tfevents.*"))
    metrics = json.loads((ok / "metrics.json").read_text())
    assert metrics["checkpoint"].endswith("version_0/checkpoints/best.ckpt")
    assert {p.name for p in out.iterdir()} >= {"results.csv", "results.md", "plot_auroc_vs_trainable_pct.png"}

    (in_tmp / "bad.yaml").write_text("data:\n  init_args:\n    train_fraction: 1.0\n")
    started: list[list[str]] = []
    real_run = executors.run_stage
    monkeypatch.setattr(executors, "run_stage", lambda cmd, *a: started.append(cmd) or real_run(cmd, *a))
    stamp = (ok / "metrics.json").stat().st_mtime_ns
    assert sweep.main(["run", str(path)]) == 0
    assert [(c[2], arg(c, "--trainer.logger.init_args.name")) for c in started] == [
        ("fit", "bad__seed=3"), ("test", "bad__seed=3")]
    assert (ok / "metrics.json").stat().st_mtime_ns == stamp
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",done," in r for r in rows[1:])

    monkeypatch.setattr(executors, "run_stage", no_subprocess)
    capsys.readouterr()
    assert sweep.main(["run", str(path)]) == 0
    assert "2 of 2 runs already finished, 0 to run" in capsys.readouterr().out


def test_submitit_local_executor_runs_the_same_path(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # the executor extends it
    path = write_sweep(in_tmp, {"seed_everything": [4]})
    assert sweep.main(["run", str(path), "--executor", "submitit-local", "--time-min", "10"]) == 0
    out = in_tmp / "sweeps/sweep"
    state = json.loads((out / "sweep_state.json").read_text())["runs"]["final/seed=4"]
    assert state["status"] == "done" and state["job_id"]
    assert (out / "runs/seed=4/version_0/metrics.json").is_file()
    assert "run.py test" in (out / "runs/seed=4/log.txt").read_text()
    assert list((out / "slurm").rglob("*_log.out")), "submitit's own job logs"
