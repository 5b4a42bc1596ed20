"""The bad-input catalogue: every bad input named in the issues, through run.py / sweep.py.

For each: a non-zero exit, a last line ``error: ...`` naming the problem, and no results left
behind that claim success (no run directory, no metrics.json).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
import sweep

ROOT = Path(run.__file__).resolve().parent
DEMO = str(ROOT / "configs" / "demo.yaml")
FAST = ["--model.init_args.backbone", "resnet18", "--model.init_args.pretrained", "false",
        "--data.init_args.num_workers", "0", "--data.init_args.image_size", "32",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.name", "bad"]


def folder(tmp: Path, corrupt: bool = False) -> Path:
    """A 2-class image folder of tiny PNGs (one truncated when ``corrupt``)."""
    root = tmp / "images"
    rng = np.random.default_rng(0)
    for c in ("benign", "malignant"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / c / f"{c} ({i}).png")
    if corrupt:
        bad = root / "benign" / "benign (3).png"
        bad.write_bytes(bad.read_bytes()[:40])
    return root


def folder_args(root: Path, tmp: Path) -> list[str]:
    return ["--data", "datamodules.ImageFolderDataModule", "--data.init_args.root", str(root),
            "--data.init_args.cache_dir", str(tmp / "cache")]


def csv_args(tmp: Path, text: str) -> list[str]:
    path = tmp / "labels.csv"
    path.write_text(text)
    return ["--data", "datamodules.CSVDataModule", "--data.init_args.csv_path", str(path),
            "--data.init_args.cache_dir", str(tmp / "cache")]


def fail(args: list[str], capsys: pytest.CaptureFixture, pattern: str, tmp: Path) -> None:
    code = run.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err and err[-1].startswith("error: "), err[-5:]
    assert re.search(pattern, err[-1]), err[-1]
    assert "Namespace(" not in err[-1]
    assert not list(tmp.rglob("metrics.json")), "a failed run must not leave results"
    assert not list((tmp / "runs").glob("*/version_*")) if (tmp / "runs").exists() else True


CASES = {
    "missing data root": (lambda t: folder_args(t / "nowhere", t), r"nowhere"),
    "corrupt image": (lambda t: folder_args(folder(t, corrupt=True), t), r"benign \(3\)\.png"),
    "malformed csv": (lambda t: csv_args(t, "file,diagnosis\na.png,0\n"), r"label.*labels\.csv|labels\.csv.*label"),
    "unknown csv class": (lambda t: [*csv_args(t, "path,label\na.png,cat\n"), "--data.init_args.class_names",
                                     "[benign, malignant]"], r"cat"),
    "missing npz": (lambda t: ["--data", "datamodules.MedMNISTDataModule", "--data.init_args.root",
                               str(t / "medmnist")], r"breastmnist\.npz"),
    "train_fraction 0": (lambda t: ["--data.init_args.train_fraction", "0"], r"train_fraction"),
    "train_fraction 1.5": (lambda t: ["--data.init_args.train_fraction", "1.5"], r"train_fraction"),
    "too many shots": (lambda t: ["--data.init_args.shots_per_class", "100000"], r"shots_per_class"),
    "unknown method": (lambda t: ["--model.init_args.peft", "peft_methods.NoSuchMethod"], r"NoSuchMethod"),
    "unknown backbone": (lambda t: ["--model.init_args.backbone", "vit_bse_patch16_224"],
                         r"vit_bse_patch16_224.*vit_base_patch16_224"),
    "method unsupported on backbone": (lambda t: ["--model.init_args.peft", "peft_methods.VPT"],
                                       r"VPT does not support backbone 'resnet18'"),
    "bad method argument": (lambda t: ["--config", str(ROOT / "configs/peft/lora.yaml"),
                                       "--model.init_args.peft.init_args.r", "0"], r"LoRA.*r"),
    "weights file that does not fit": (lambda t: ["--model.init_args.pretrained", _vit_weights(t)],
                                       r"does not fit backbone 'resnet18'"),
    "missing weights file": (lambda t: ["--model.init_args.pretrained", str(t / "w.pth")], r"w\.pth"),
    "unwritable output dir": (lambda t: ["--trainer.logger.init_args.save_dir", _blocked(t)], r"not writable"),
}


def _vit_weights(tmp: Path) -> str:
    import timm

    path = tmp / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), path)
    return str(path)


def _blocked(tmp: Path) -> str:
    (tmp / "file").write_text("")
    return str(tmp / "file" / "runs")


@pytest.mark.parametrize("case", sorted(CASES))
def test_fit_rejects_bad_input(case: str, in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    make_args, pattern = CASES[case]
    fail(["fit", "--config", DEMO, *FAST, *make_args(in_tmp)], capsys, pattern, in_tmp)


def test_checkpoint_of_another_method_is_refused(in_tmp: Path) -> None:
    """run.py rebuilds the checkpoint's own model; a model built otherwise is refused, not half-loaded."""
    import lightning as L

    from datamodules import SyntheticDataModule
    from lightning_modules import ImageClassifier
    from peft_methods import NormTuning

    small = ["--data.init_args.num_train", "16", "--data.init_args.num_val", "8", "--data.init_args.num_test", "8"]
    assert run.main(["fit", "--config", DEMO, *FAST, *small]) == 0
    ckpt = next(in_tmp.glob("runs/bad/version_0/checkpoints/best.ckpt"))
    other = ImageClassifier("resnet18", NormTuning(), num_classes=3, pretrained=False)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, default_root_dir=in_tmp / "other")
    data = SyntheticDataModule(num_train=16, num_val=8, num_test=8, image_size=32, num_workers=0)
    with pytest.raises(ValueError, match=r"peft_methods\.BitFit.*peft_methods\.NormTuning"):
        trainer.test(other, datamodule=data, ckpt_path=ckpt)
    assert not (in_tmp / "other" / "metrics.json").exists()
    from peft_methods import BitFit

    wrong_classes = ImageClassifier("resnet18", BitFit(), num_classes=4, pretrained=False)
    with pytest.raises(ValueError, match="num_classes=3.*num_classes=4"):
        wrong_classes.on_load_checkpoint(torch.load(ckpt, weights_only=True))


def test_adapter_for_another_class_count_is_refused(tmp_path: Path) -> None:
    import timm

    from peft_methods import LoRA
    from peft_methods.export import export_adapter, load_adapter

    method = LoRA()
    model = method.apply(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3))
    export_adapter(model, method, tmp_path / "adapter", {"backbone": "vit_tiny_patch16_224", "num_classes": 3,
                                                        "img_size": 32, "pretrained": False})
    other = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5)
    with pytest.raises(ValueError, match="3.*5|5.*3"):
        load_adapter(tmp_path / "adapter", model=other)


SWEEP_CASES = {
    "unknown axis key": ("grid: {model.init_args.no_such_arg: [1, 2]}\n", r"no_such_arg"),
    "missing config file": ("grid: {method: [configs/peft/no_such.yaml]}\n", r"no_such\.yaml"),
    "empty grid": ("grid: {seed_everything: []}\n", r"empty|no run"),
}


@pytest.mark.parametrize("case", sorted(SWEEP_CASES))
def test_sweep_rejects_bad_input_before_any_run(case: str, in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    body, pattern = SWEEP_CASES[case]
    path = in_tmp / "s.yaml"
    path.write_text(f"configs: [{DEMO}]\n{body}")
    code = sweep.main(["run", str(path), "--out", str(in_tmp / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith("error: ")
    assert re.search(pattern, err[-1], re.IGNORECASE), err[-1]
    assert not (in_tmp / "out" / "runs").exists()


def test_slurm_without_sbatch_is_refused(in_tmp: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(in_tmp))  # no sbatch anywhere
    path = in_tmp / "s.yaml"
    path.write_text(f"configs: [{DEMO}]\ngrid: {{seed_everything: [0]}}\n")
    code = sweep.main(["run", str(path), "--executor", "slurm", "--out", str(in_tmp / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "sbatch" in err[-1]
