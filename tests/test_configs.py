"""Every YAML under configs/ parses; methods build and apply; experiment configs resolve."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import yaml

import run
from peft_methods.base import build_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))
PEFT_YAML = sorted((CONFIGS / "peft").glob("*.yaml"))
EXPERIMENTS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "base.yaml")
DEMO = CONFIGS / "demo.yaml"


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_yaml_loads(path: Path) -> None:
    assert isinstance(yaml.safe_load(path.read_text()), dict)


@pytest.mark.parametrize("path", PEFT_YAML, ids=lambda p: p.stem)
def test_peft_config_builds_and_applies(path: Path) -> None:
    spec = yaml.safe_load(path.read_text())["model"]["init_args"]["peft"]
    method = build_method(spec)
    backbones = {
        "vit": lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3),
        "cnn": lambda: timm.create_model("resnet18", num_classes=3),
    }
    applied = 0
    for build in backbones.values():
        model = build()
        if method.unsupported_reason(model) is None:
            method.apply(model)
            applied += 1
    diffusion_only = "UNet" in (method.unsupported_reason(backbones["vit"]()) or "")
    assert applied or diffusion_only, f"{path.name} applies to neither a ViT nor a CNN"


def print_config(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    with pytest.raises(SystemExit) as info:
        run.cli_main(args + ["--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_config_resolves(path: Path, capsys: pytest.CaptureFixture) -> None:
    config = print_config(["fit", "--config", str(path)], capsys)
    assert config["model"]["class_path"].startswith("lightning_modules.")
    assert config["data"]["class_path"].startswith("datamodules.")
    assert config["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert "lightning_modules.resume.Preemption" in callbacks, "every experiment stops cleanly when pre-empted"


@pytest.mark.parametrize(
    "path", sorted((CONFIGS / "data").glob("*.yaml")) + sorted((CONFIGS / "model").glob("*.yaml"))
    + sorted((CONFIGS / "trainer").glob("*.yaml")) + PEFT_YAML,
    ids=lambda p: str(p.relative_to(CONFIGS)),
)
def test_override_config_composes_with_the_demo(path: Path, capsys: pytest.CaptureFixture) -> None:
    config = print_config(["fit", "--config", str(DEMO), "--config", str(path)], capsys)
    override = yaml.safe_load(path.read_text())
    for section in ("model", "data"):
        if section in override and "class_path" in override[section]:
            assert config[section]["class_path"] == override[section]["class_path"]
    peft = override.get("model", {}).get("init_args", {}).get("peft")
    if peft:
        assert config["model"]["init_args"]["peft"]["class_path"] == peft["class_path"]
