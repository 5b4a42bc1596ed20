"""Adapter export / loading (peft format for peft-library methods, ours otherwise) and the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lightning_modules.backbones import create_backbone
from peft_methods import IA3, LoHa, LoRA, NormTuning, PeftMethod
from peft_methods.export import META_FILE, PEFT_CONFIG, PEFT_WEIGHTS, export_adapter, load_adapter
from peft_methods.qkv_split import split_qkv
from peft_methods.report import build_report, format_table, main

ROOT = Path(__file__).resolve().parents[1]
VIT = dict(name="vit_tiny_patch16_224", img_size=32)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local "pretrained" weight files of the tiny backbones (what a fresh backbone loads)."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    files = {"vit": root / "vit.safetensors", "cnn": root / "cnn.safetensors"}
    save_file(timm.create_model(VIT["name"], img_size=32, num_classes=3).state_dict(), str(files["vit"]))
    save_file(timm.create_model("resnet18", num_classes=3).state_dict(), str(files["cnn"]))
    return files


def backbone(kind: str, weights: dict[str, Path], num_classes: int = 3) -> torch.nn.Module:
    if kind == "vit":
        return create_backbone(VIT["name"], num_classes, pretrained=str(weights["vit"]), img_size=32)
    return create_backbone("resnet18", num_classes, pretrained=str(weights["cnn"]))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0])


def trained(method: PeftMethod, kind: str, weights: dict[str, Path]) -> torch.nn.Module:
    """A few SGD steps (train mode: BatchNorm statistics that train move too), then eval."""
    torch.manual_seed(3)
    model = method.apply(backbone(kind, weights)).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = inputs()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def export(method: PeftMethod, kind: str, weights: dict[str, Path], out: Path) -> tuple[torch.nn.Module, Path]:
    model = trained(method, kind, weights)
    meta = {"pretrained": str(weights[kind]), "img_size": 32 if kind == "vit" else None}
    return model, export_adapter(model, method, out, meta)


@pytest.fixture(scope="module")
def lora_export(weights: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A LoRA (q, v slices) ViT trained a few steps and exported (shared: building ViTs is slow)."""
    return export(LoRA(), "vit", weights, tmp_path_factory.mktemp("lora") / "adapter")


def check_round_trip(model: torch.nn.Module, method: PeftMethod, directory: Path, files: set[str], source: Path) -> None:
    assert {p.name for p in directory.iterdir()} == files
    record = json.loads((directory / META_FILE).read_text())
    assert record["format_version"] == 1 and record["method"] == method.config()
    assert record["meta"]["num_classes"] == 3 and record["meta"]["pretrained"] == str(source)
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size < 0.1 * source.stat().st_size  # adapter only
    loaded, loaded_method = load_adapter(directory)
    assert loaded_method == method
    x, _ = inputs()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_lora_export_is_peft_format_and_loads_onto_a_fresh_backbone(
    lora_export: tuple[torch.nn.Module, Path], weights: dict[str, Path]
) -> None:
    model, directory = lora_export
    check_round_trip(model, LoRA(), directory, {META_FILE, PEFT_CONFIG, PEFT_WEIGHTS}, weights["vit"])


@pytest.mark.parametrize(
    ("method", "kind", "files"),
    [
        (IA3(), "vit", {META_FILE, PEFT_CONFIG, PEFT_WEIGHTS}),
        (NormTuning(), "cnn", {META_FILE, "adapter.safetensors", "adapter_method.json"}),
    ],
    ids=["ia3-vit", "normtuning-cnn"],
)
def test_export_loads_onto_a_fresh_backbone_with_identical_logits(
    method: PeftMethod, kind: str, files: set[str], weights: dict[str, Path], tmp_path: Path
) -> None:
    model, directory = export(method, kind, weights, tmp_path / "adapter")
    check_round_trip(model, method, directory, files, weights[kind])


def test_lora_export_loads_with_plain_peft(
    lora_export: tuple[torch.nn.Module, Path], weights: dict[str, Path]
) -> None:
    from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict

    model, directory = lora_export
    x, _ = inputs()
    with torch.no_grad():
        expected = model(x)
    config = LoraConfig.from_pretrained(str(directory))
    assert config.target_modules == {f"blocks.{i}.attn.qkv.{s}" for i in range(12) for s in "qv"}
    assert config.modules_to_save == ["head"]
    # inject + set_peft_model_state_dict onto the same timm model (slice targets: split qkv first)
    plain = split_qkv(backbone("vit", weights), sorted(config.target_modules))
    inject_adapter_in_model(config, plain)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(directory / PEFT_WEIGHTS)).items()}
    result = set_peft_model_state_dict(plain, state)
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), expected, atol=1e-6, rtol=0)
    # PeftModel.from_pretrained, as for any peft adapter (a fresh copy of the same backbone)
    fresh = split_qkv(backbone("vit", weights), sorted(LoraConfig.from_pretrained(str(directory)).target_modules))
    peft_model = PeftModel.from_pretrained(fresh, str(directory)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), expected, atol=1e-6, rtol=0)


def test_adapter_for_another_backbone_class_count_or_method_fails_clearly(
    lora_export: tuple[torch.nn.Module, Path], weights: dict[str, Path], tmp_path: Path
) -> None:
    adapted, lora_dir = lora_export
    with pytest.raises(ValueError, match=r"exported for backbone='vit_tiny_patch16_224'.*'resnet18'"):
        load_adapter(lora_dir, model=backbone("cnn", weights))
    with pytest.raises(ValueError, match=r"exported for num_classes=3.*num_classes=5"):
        load_adapter(lora_dir, model=backbone("vit", weights, num_classes=5))
    with pytest.raises(ValueError, match="needs a plain backbone"):
        load_adapter(lora_dir, model=adapted)
    # tensors of another method under this record: never a silent partial load
    loha = LoHa()
    loha_dir = export_adapter(loha.apply(backbone("vit", weights)), loha, tmp_path / "loha", {})
    mixed = tmp_path / "mixed"
    shutil.copytree(lora_dir, mixed)
    shutil.copy(loha_dir / PEFT_WEIGHTS, mixed / PEFT_WEIGHTS)
    with pytest.raises(ValueError, match=r"do not fit LoRA on backbone 'vit_tiny_patch16_224'.*missing \(48\).*unexpected \(96\)"):
        load_adapter(mixed)
    # same keys, other shapes (another rank)
    record = json.loads((mixed / META_FILE).read_text())
    record["method"]["init_args"]["r"] = 4
    (mixed / META_FILE).write_text(json.dumps(record))
    shutil.copy(lora_dir / PEFT_WEIGHTS, mixed / PEFT_WEIGHTS)
    with pytest.raises(ValueError, match=r"shape mismatch \(48\)"):
        load_adapter(mixed)
    with pytest.raises(FileNotFoundError, match="not an adapter exported"):
        load_adapter(tmp_path / "nowhere")


def test_loader_builds_the_backbone_with_overridden_weights(weights: dict[str, Path], tmp_path: Path) -> None:
    model, directory = export(LoRA(targets=["qkv", "fc2"]), "vit", weights, tmp_path / "a")
    moved = tmp_path / "moved.safetensors"
    shutil.copy(weights["vit"], moved)
    loaded, _ = load_adapter(directory, pretrained=str(moved))
    x, _ = inputs()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_unet_adapter_round_trips_onto_the_callers_unet(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    ).eval()
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    method = LoRA(r=4, alpha=4)
    model = method.apply(unet)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    directory = export_adapter(model, method, tmp_path / "unet", {"pretrained": "tiny UNet from config"})
    fresh = UNet2DConditionModel.from_config(unet.config)
    fresh.load_state_dict(base)
    loaded, _ = load_adapter(directory, model=fresh)
    sample, t, text = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(sample, t, text).sample, model(sample, t, text).sample)
    with pytest.raises(ValueError, match="records no timm backbone name; pass the model"):
        load_adapter(directory)


# ---------------------------------------------------------------------------------- the report
METHODS_MD_COUNTS = {  # ../shared/METHODS.md: vit_base_patch16_224, num_classes=0
    "bitfit": 102_912,
    "norm_tuning": 38_400,
    "attention_tuning": 28_348_416,
    "vpt": 7_680,
    "vpt_shallow": 7_680,
    "vpt_deep": 92_160,
    "lora": 294_912,
    "dora": 322_560,
    "adaptformer": 1_189_632,
    "adapter_houlsby": 2_379_264,
    "houlsby": 2_379_264,
    "adapter_pfeiffer": 1_779_840,
    "pfeiffer": 1_779_840,
    "convpass": 327_552,
    "ssf": 205_824,
    "fact_tt": 21_504,
    "fact_tk": 86_528,
    "linear_probe": 0,
    "full": 85_798_656,
}


def test_report_json_gives_the_methods_md_counts_on_vit_base(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--backbone", "vit_base_patch16_224", "--num-classes", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {p.stem for p in (ROOT / "configs" / "peft").glob("*.yaml")}
    assert [r["config"] for r in rows] == sorted(names)
    checked = 0
    for row in rows:
        assert {"config", "method", "trainable", "total", "mergeable", "supported"} <= set(row)
        if row["config"] in METHODS_MD_COUNTS:
            assert row["supported"], row
            assert row["trainable"] == METHODS_MD_COUNTS[row["config"]], row["config"]
            checked += 1
    assert checked >= 5 and {"lora", "dora"} <= names
    full = next(r for r in rows if r["method"] == "FullFineTuning")
    assert all(r["total"] >= full["total"] for r in rows if r["supported"])


def test_report_marks_unsupported_methods_with_the_reason(tmp_path: Path) -> None:
    for name in ("lora", "vera"):
        shutil.copy(ROOT / "configs" / "peft" / f"{name}.yaml", tmp_path)
    rows = build_report("resnet18", num_classes=3, config_dir=tmp_path)
    lora, vera = rows
    assert lora["supported"] and lora["mergeable"] and lora["trainable"] < lora["total"]
    assert not vera["supported"] and "Linear" in vera["reason"]
    table = format_table(rows).splitlines()
    assert table[0].split() == ["config", "method", "trainable", "total", "%", "trainable", "mergeable", "supported"]
    assert f"{lora['trainable']:,}" in table[2] and "no: " in table[3]


def test_report_unknown_backbone_exits_2_with_close_names() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "peft_methods.report", "--backbone", "vit_bsae_patch16_224"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "Unknown backbone 'vit_bsae_patch16_224'" in done.stderr and "vit_base_patch16_224" in done.stderr
