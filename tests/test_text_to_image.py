"""TextToImage and the diffusion PEFT methods on a tiny Stable Diffusion (CPU, offline).

Every method on a tiny UNet: trainable count by formula, identity at init, exact merge, one step
changes only trainable tensors. Then the LightningModule end to end (fit -> FID test -> predict),
the diffusers LoRA export, precompute, EMA checkpoints, caption datamodules and bad inputs.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from datamodules.captions import CaptionCSVDataModule, SyntheticCaptionDataModule, synthetic_chest_xray
from lightning_modules.t2i_components import build_tiny_components
from lightning_modules.t2i_data import LatentCache
from lightning_modules.t2i_export import build_pipeline, export_adapter
from lightning_modules.t2i_fid import FIDFeatureExtractor, build_fid
from lightning_modules.t2i_sampling import generate, make_pipeline
from lightning_modules.t2i_training import diffusion_loss
from lightning_modules.text_to_image import TextToImage
from peft_methods import (
    OFT,
    AttentionTuning,
    BitFit,
    DiffFit,
    FullFineTuning,
    LinearProbe,
    LoHa,
    LoKr,
    LoRA,
    NormBiasAttention,
    NormTuning,
    SVDiff,
    count_params,
)
from peft_methods.base import trainable_state_dict

SIZE = 64  # pixels; latents 16x16, attention at 8x8
ROOT = Path(__file__).resolve().parents[1]
FAST_FID = {"name": "resnet18", "input_size": 32}  # random-init proxy: offline and fast
PROMPTS = ["a chest x-ray with a large round bright lesion in the upper left lung", "a normal chest x-ray"]

METHODS: dict[str, Callable[[], object]] = {
    "full": FullFineTuning, "attention": AttentionTuning,
    "attention_projections": lambda: AttentionTuning("projections"), "bitfit": BitFit, "norm": NormTuning,
    "norm_bias_attention": NormBiasAttention, "lora": lambda: LoRA(r=4, alpha=4), "loha": lambda: LoHa(r=4, alpha=4),
    "lokr": lambda: LoKr(r=4, alpha=4), "oft": OFT, "difffit": DiffFit, "svdiff": SVDiff,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The tiny model's ops are too small to gain from threads; on a busy machine extra threads
    spin-wait and slow every op down (~20x measured on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _base_unet() -> nn.Module:
    return build_tiny_components(SIZE).unet.eval()


def fresh_unet() -> nn.Module:
    return copy.deepcopy(_base_unet())


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)


def run_unet(unet: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return unet(*unet_inputs()).sample


def expected_trainable(name: str, unet: nn.Module) -> int | None:
    """Trainable count of each method on a plain UNet by its definition (None: peft's own factorisation)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention

    params = dict(unet.named_parameters())
    norms = {f"{m}.{p}" for m, mod in unet.named_modules() if isinstance(mod, (nn.GroupNorm, nn.LayerNorm))
             for p, _ in mod.named_parameters(recurse=False)}
    biases = {n for n in params if n.endswith(".bias")}
    blocks = {n for n in params if "attentions" in n.split(".")}
    attn = [mod for mod in unet.modules() if isinstance(mod, Attention)]
    proj_layers = [a.get_submodule(c) for a in attn for c in ("to_q", "to_k", "to_v", "to_out.0")]
    proj = {id(p) for layer in proj_layers for p in layer.parameters()}
    total = lambda names: sum(params[n].numel() for n in names)  # noqa: E731
    svd = sum(min(m.weight.shape[0], m.weight[0].numel()) for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    svd += sum(1 for m in unet.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None)
    gammas = sum(b.attn1.to_out[0].out_features * (3 if b.attn2 is not None else 2)
                 for b in unet.modules() if isinstance(b, BasicTransformerBlock))
    return {
        "full": total(params), "attention": total(blocks),
        "attention_projections": sum(p.numel() for p in unet.parameters() if id(p) in proj),
        "bitfit": total(biases), "norm": total(norms), "norm_bias_attention": total(biases | norms | blocks),
        "lora": sum(4 * (m.in_features + m.out_features) for m in proj_layers),
        "loha": sum(2 * 4 * (m.in_features + m.out_features) for m in proj_layers),
        "difffit": total(biases | norms) + gammas, "svdiff": svd,
    }.get(name)


@pytest.mark.parametrize("name", list(METHODS))
def test_diffusion_method_on_a_tiny_unet(name: str) -> None:
    method, base = METHODS[name](), fresh_unet()
    reference = run_unet(base)
    unet = method.apply(fresh_unet()).eval()
    trainable, total = count_params(unet)
    expected = expected_trainable(name, base)
    assert trainable == (expected if expected is not None else trainable) and trainable > 0
    prefix = method.param_prefix
    if prefix:  # only the method's own tensors train (DiffFit's also include the biases and norms)
        extra = (lambda n: n.endswith("bias") or "norm" in n) if name == "difffit" else (lambda n: False)
        assert all(any(part.startswith(prefix) for part in n.split(".")) or extra(n)
                   for n, p in unet.named_parameters() if p.requires_grad)
    torch.testing.assert_close(run_unet(unet), reference, atol=1e-6, rtol=0)  # identity at init

    # Gradient checkpointing gives the same gradients; trainable tensors round-trip onto a fresh UNet.
    grads = []
    for checkpointing in (False, True):
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.zero_grad()
        unet(*unet_inputs()).sample.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad})
    unet.disable_gradient_checkpointing()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    restored = METHODS[name]().apply(fresh_unet()).eval()
    restored.load_state_dict(trainable_state_dict(unet), strict=False)
    torch.testing.assert_close(run_unet(restored), run_unet(unet.eval()), atol=0, rtol=0)
    unet.zero_grad(set_to_none=True)

    # One optimizer step (two: zero-init factors) moves trainable tensors only; all get gradients.
    unet.train()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    opt = torch.optim.SGD([p for p in unet.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        unet(*unet_inputs()).sample.pow(2).mean().backward()
        assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
        opt.step()
    changed = {n for n, p in unet.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all(dict(unet.named_parameters())[n].requires_grad for n in changed)

    # Merge: same outputs (fp32, atol 1e-5) from a plain UNet with the original keys and size.
    unet.eval()
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    unmerged = run_unet(unet)
    merged = method.merge(unet)
    torch.testing.assert_close(run_unet(merged), unmerged, atol=1e-5, rtol=1e-5)
    assert list(merged.state_dict()) == list(base.state_dict())
    assert count_params(merged)[1] == count_params(base)[1]


def test_attention_tuning_scopes_keep_vit_counts() -> None:
    import timm

    counts = []
    for scope in ("blocks", "projections"):
        vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
        counts.append(count_params(AttentionTuning(scope).apply(vit))[0])
    assert counts == [12 * (192 * 576 + 576 + 192 * 192 + 192)] * 2  # qkv + proj of 12 blocks
    with pytest.raises(ValueError, match="scope"):
        AttentionTuning("everything")  # type: ignore[arg-type]


def test_difffit_rejects_a_vit_and_svdiff_splits_learning_rates() -> None:
    import timm

    with pytest.raises(ValueError, match="DiffFit does not support backbone 'vit_tiny_patch16_224'"):
        DiffFit().apply(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0))
    model = TextToImage(tiny=True, image_size=SIZE, peft=SVDiff(lr_1d=1e-6), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    groups = {g["name"]: g for g in model.configure_optimizers().param_groups}
    norms = sum(1 for m in model.unet.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm)))
    assert groups["svdiff_1d"]["lr"] == 1e-6 and len(groups["svdiff_1d"]["params"]) == norms
    assert groups["svdiff_matrix"]["lr"] == 1e-3 and groups["svdiff_matrix"]["weight_decay"] == 0.0
    # Without autograd W' is materialised once and refreshed when a delta changes.
    layer = model.unet.conv_in
    with torch.no_grad():
        w1 = layer.weight
        assert layer.weight is w1
        layer.parametrizations.weight[0].svdiff_delta.add_(0.5)
        assert not torch.equal(layer.weight, w1)


def tiny_module(**kwargs: object) -> TextToImage:
    args = dict(tiny=True, image_size=SIZE, num_inference_steps=2, sample_every_n_steps=2,
                fid_feature_extractor=FAST_FID, validation_prompts=PROMPTS)
    return TextToImage(**{**args, **kwargs})


def tiny_data(**kwargs: object) -> SyntheticCaptionDataModule:
    args = dict(num_train=8, num_val=4, num_test=6, image_size=SIZE, batch_size=4, num_workers=0)
    return SyntheticCaptionDataModule(**{**args, **kwargs})


def trainer(root: Path, **kwargs: object) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(
        accelerator="cpu", max_steps=4, val_check_interval=2, logger=TensorBoardLogger(root, name="t2i"),
        callbacks=[ModelCheckpoint(monitor="val/loss", mode="min", filename="best")],
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )


def test_fit_test_predict_end_to_end(tmp_path: Path) -> None:
    module = tiny_module(peft=DiffFit(), precompute=True, ema_decay=0.9, fid_num_images=5)
    fit = trainer(tmp_path)
    fit.fit(module, tiny_data())
    run_dir = Path(fit.log_dir)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_0000000.png", "step_0000002.png", "step_0000004.png"]
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert {p.name for p in (run_dir / "adapter").iterdir()} == {"adapter.safetensors", "adapter_method.json", "medpeft_adapter.json"}
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == {f"unet.{k}" for k in trainable_state_dict(module.unet)}
    assert set(ckpt["ema"]["shadow"]) == {n for n, p in module.unet.named_parameters() if p.requires_grad}

    fresh = tiny_module(peft=DiffFit(), ema_decay=0.9, fid_num_images=5)  # restored from trainable tensors only
    fit.test(fresh, tiny_data(), ckpt_path=str(run_dir / "checkpoints" / "best.ckpt"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["metrics"]["num_images"] == 5 and metrics["metrics"]["num_real_images"] == 6
    assert metrics["metrics"]["fid"] >= 0 and metrics["metrics"]["loss"] > 0
    assert (metrics["trainable_params"], metrics["total_params"]) == count_params(fresh.unet)
    assert "proxy" in metrics["fid_feature_extractor"] and metrics["fit"]["global_steps"] == 4

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a normal chest x-ray\n\na chest x-ray with a small oval bright lesion in the lower right lung\n")
    fit.predict(fresh, tiny_data(predict_prompts=str(prompts)))
    with open(run_dir / "predictions" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == ["prompt_00000.png", "prompt_00001.png"]
    assert all((run_dir / "predictions" / r["file"]).is_file() for r in rows)


def test_precompute_gives_the_training_loss_of_on_the_fly_encoding() -> None:
    module = tiny_module(peft=BitFit())
    batch = next(iter(tiny_data().train_dataloader()))
    captions = list(batch["caption"])
    mean, std = module.encode_images(batch["image"])
    module.latent_cache = LatentCache(
        dict(zip(batch["id"], mean, strict=True)), dict(zip(batch["id"], std, strict=True)),
        dict(zip(captions, module.encode_text(captions), strict=True)),
    )
    losses = []
    for cached in (False, True):
        torch.manual_seed(5)
        losses.append(diffusion_loss(module.unet, module.noise_scheduler, *module._inputs(batch, captions, cached=cached)))
    assert losses[0].item() == losses[1].item()


def test_lora_export_loads_with_load_lora_weights(tmp_path: Path) -> None:
    module = tiny_module(peft=LoRA(r=4, alpha=8))
    with torch.no_grad():
        for n, p in module.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    ours = module.generate(PROMPTS, [1, 2])
    export_adapter(module.unet, module.peft, tmp_path, module.base_info())
    comps = build_tiny_components(SIZE)
    pipe = make_pipeline(comps.unet, comps.vae, comps.text_encoder, comps.tokenizer, comps.scheduler_config)
    before = generate(pipe, PROMPTS, [1, 2], SIZE, 2, 4.0)
    pipe.load_lora_weights(str(tmp_path))
    assert torch.equal(generate(pipe, PROMPTS, [1, 2], SIZE, 2, 4.0), ours)
    assert not torch.equal(before, ours)


@pytest.mark.parametrize("method", [DiffFit, SVDiff, LoRA], ids=["DiffFit", "SVDiff", "LoRA"])
def test_exported_adapter_rebuilds_a_merged_pipeline(tmp_path: Path, method: type) -> None:
    module = tiny_module(peft=method())
    with torch.no_grad():
        for p in module.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.05)
    ours = module.generate(PROMPTS, [3, 4])
    export_adapter(module.unet, module.peft, tmp_path, module.base_info())
    pipe = build_pipeline(tmp_path, merge=True)
    assert count_params(pipe.unet)[1] == count_params(_base_unet())[1]
    assert (generate(pipe, PROMPTS, [3, 4], SIZE, 2, 4.0).int() - ours.int()).abs().max() <= 1


def test_checkpoint_keeps_trained_weights_under_ema_and_rejects_another_method() -> None:
    module = tiny_module(peft=BitFit(), ema_decay=0.5)
    name, param = next((n, p) for n, p in module.unet.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param.add_(1.0)
    module.ema.update(module.unet)
    trained = param.detach().clone()
    with module.ema_weights():
        assert not torch.equal(param, trained)
        ckpt: dict = {}
        module.on_save_checkpoint(ckpt)
    assert torch.equal(ckpt["state_dict"][f"unet.{name}"], trained) and torch.equal(param, trained)
    tiny_module(peft=BitFit(), ema_decay=0.5).on_load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="Checkpoint was made for method"):
        tiny_module(peft=NormTuning()).on_load_checkpoint(ckpt)


def test_local_directory_in_the_sd15_layout_loads(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler

    from lightning_modules.t2i_components import SD_SCHEDULE

    comps = build_tiny_components(SIZE)
    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(comps, sub).save_pretrained(tmp_path / sub)
    DDPMScheduler.from_config(SD_SCHEDULE).save_pretrained(tmp_path / "scheduler")
    local = TextToImage(pretrained=str(tmp_path), image_size=SIZE, peft=BitFit(), num_inference_steps=2)
    assert torch.equal(local.generate(PROMPTS, [5, 6]), tiny_module(peft=BitFit()).generate(PROMPTS, [5, 6]))


def test_sd15_tiny_layout_is_stable_diffusion_at_quarter_width() -> None:
    """Same module names, blocks and head widths as SD v1.5 (built on the meta device from its
    configs), 1/16 of the parameters; same seed, same weights."""
    from diffusers.models.attention_processor import Attention

    from benchmarks.t2i import sd15_on_meta

    tiny, (unet, vae, text) = build_tiny_components(SIZE, layout="sd15"), sd15_on_meta()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 15.8 < count(unet) / count(tiny.unet) < 16.1
    assert 15.8 < count(vae.encoder) / count(tiny.vae.encoder) < 16.1
    for ours, theirs in ((tiny.unet, unet), (tiny.vae, vae)):
        names = lambda m: [(n, type(b).__name__) for n, b in m.named_modules()]  # noqa: E731
        assert names(ours) == names(theirs)
    head_widths = lambda m: [a.inner_dim // a.heads for a in m.modules() if isinstance(a, Attention)]  # noqa: E731
    assert head_widths(tiny.unet) == head_widths(unet) and sorted(set(head_widths(unet))) == [40, 80, 160]
    assert tiny.vae_factor == 8 and tiny.text_encoder.config.num_hidden_layers == text.config.num_hidden_layers
    assert 4 * tiny.text_encoder.config.hidden_size == text.config.hidden_size
    again = build_tiny_components(SIZE, layout="sd15").unet.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in tiny.unet.state_dict().items())


def test_tiny_parses_as_a_flag_or_a_layout_name() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TextToImage, "model")
    parsed = [parser.parse_args(["--model.tiny", v]).model.tiny for v in ("true", "sd15", "demo", "false")]
    assert parsed == [True, "sd15", "demo", False]
    with pytest.raises(Exception, match="sd21"):
        parser.parse_args(["--model.tiny", "sd21"])


def test_sd15_tiny_module_is_recorded_and_its_export_rebuilds_it(tmp_path: Path) -> None:
    module = TextToImage(tiny="sd15", image_size=SIZE, peft=LoRA(r=4, alpha=4), num_inference_steps=2)
    assert module.base_info()["tiny"] == "sd15" and tiny_module(peft=BitFit()).base_info()["tiny"] is True
    assert TextToImage(tiny="demo", image_size=SIZE, peft=BitFit()).base_info()["tiny"] is True
    with torch.no_grad():
        for p in module.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.05)
    ours = module.generate(PROMPTS[:1], [3])
    export_adapter(module.unet, module.peft, tmp_path, module.base_info())
    pipe = build_pipeline(tmp_path, merge=True)
    assert count_params(pipe.unet)[1] == count_params(build_tiny_components(SIZE, layout="sd15").unet)[1]
    assert (generate(pipe, PROMPTS[:1], [3], SIZE, 2, 4.0).int() - ours.int()).abs().max() <= 1
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    with pytest.raises(ValueError, match="Checkpoint was made for tiny='sd15' but this run has tiny=True"):
        tiny_module(peft=LoRA(r=4, alpha=4)).on_load_checkpoint(ckpt)


def test_bad_model_inputs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 4"):
        TextToImage(tiny=True, image_size=66)
    with pytest.raises(ValueError, match="exactly one of model.init_args.pretrained"):
        TextToImage()
    with pytest.raises(ValueError, match=r"model.init_args.tiny='sd21' is not a known tiny layout; use true or 'demo'"):
        TextToImage(tiny="sd21")
    with pytest.raises(FileNotFoundError, match="lacks the subfolders"):
        TextToImage(pretrained=str(tmp_path))
    with pytest.raises(OSError, match="offline machine"):
        TextToImage(pretrained="runwayml/stable-diffusion-v1-5")
    with pytest.raises(ValueError, match="no trainable parameter in the UNet"):
        TextToImage(tiny=True, image_size=SIZE, peft=LinearProbe())
    from peft_methods import VPT

    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        TextToImage(tiny=True, image_size=SIZE, peft=VPT())
    module = tiny_module(peft=BitFit())
    with pytest.raises(ValueError, match="image_size is 64"):
        module.encode_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.warns(UserWarning, match="77-token limit"):
        module.encode_text(["lesion " * 100])
    with pytest.raises((ModuleNotFoundError, OSError), match="fid_feature_extractor"):
        build_fid(FIDFeatureExtractor())  # Inception: torch-fidelity / weights absent offline


def test_fid_features_from_a_classifier_adapter(tmp_path: Path) -> None:
    import timm

    from lightning_modules.t2i_fid import TimmFeatures
    from peft_methods.export import export_adapter as export_classifier

    torch.manual_seed(0)
    classifier = BitFit().apply(timm.create_model("resnet18", num_classes=3))
    export_classifier(classifier, BitFit(), tmp_path, {"pretrained": False})
    features = TimmFeatures(FIDFeatureExtractor(name="resnet18", weights=str(tmp_path), input_size=32))
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    assert features(images).shape == (2, 512) and not features.training
    with pytest.raises(ValueError, match="does not match the classifier adapter"):
        TimmFeatures(FIDFeatureExtractor(name="resnet34", weights=str(tmp_path)))


def test_synthetic_captions_are_deterministic_and_describe_the_image() -> None:
    a, cap_a = synthetic_chest_xray(0, 7, SIZE)
    b, cap_b = synthetic_chest_xray(0, 7, SIZE)
    assert (a == b).all() and cap_a == cap_b and a.shape == (3, SIZE, SIZE) and a.dtype.name == "uint8"
    batch = next(iter(tiny_data().val_dataloader()))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].dtype == torch.uint8
    assert all("chest x-ray" in c for c in batch["caption"]) and len(set(batch["id"])) == 4


def test_caption_csv_bad_inputs(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30), (120, 30, 30)).save(tmp_path / "a.png")
    good = tmp_path / "good.csv"
    good.write_text("image_path,text_caption\n" + "".join(f"a.png,caption {i}\n" for i in range(10)))
    dm = CaptionCSVDataModule(str(good), image_size=16, batch_size=2, num_workers=0)
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (1, 3, 16, 16) and len(set(dm.ids)) == 10  # duplicate paths get row ids
    cases = {
        "image_path,caption\na.png,x\n": "must have the columns",
        "image_path,text_caption\na.png,  \n": "empty caption",
        "image_path,text_caption\nmissing.png,x\n": "missing under",
    }
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.csv"
        bad.write_text(text)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            CaptionCSVDataModule(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CaptionCSVDataModule(str(tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="predict_prompts"):
        dm.predict_dataloader()


@pytest.mark.realdata
def test_busi_captions_load(shared_data: Path) -> None:
    dm = CaptionCSVDataModule(str(shared_data / "busi" / "all_captions.csv"), stratify_column="label",
                              image_size=SIZE, batch_size=4, num_workers=0)
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 624, "val": 78, "test": 78}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and all(c.endswith(".") for c in batch["caption"])


def test_demo_config_runs_through_the_cli(in_tmp: Path) -> None:
    import yaml

    import run

    override = in_tmp / "small.yaml"
    override.write_text(yaml.safe_dump({
        "model": {"init_args": {"num_inference_steps": 2, "sample_every_n_steps": 2, "fid_num_images": 4,
                                "fid_feature_extractor": {**FAST_FID, "weights": None}}},
        "data": {"init_args": {"num_train": 8, "num_val": 4, "num_test": 4, "batch_size": 4, "num_workers": 0}},
        "trainer": {"max_steps": 2, "val_check_interval": 2, "enable_progress_bar": False},
    }))
    args = ["--config", str(ROOT / "configs" / "demo_t2i.yaml"), "--config", str(override)]
    run.cli_main(["fit", *args])
    run.cli_main(["test", *args])
    (run_dir,) = sorted((in_tmp / "runs" / "demo_t2i").glob("version_*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["metrics"]["num_images"] == 4 and metrics["method"]["class_path"] == "peft_methods.LoRA"
    assert (run_dir / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_latents_are_encoded_from_every_training_pair_in_order() -> None:
    """The precompute cache reads an unsharded, in-order loader: each DDP rank's shuffled shard finds its ids."""
    from datamodules.sampling import EpochShuffleSampler

    data = tiny_data(num_train=16)
    ids = [i for batch in data.encoding_dataloader() for i in batch["id"]]
    shuffled = [i for batch in data.train_dataloader() for i in batch["id"]]
    assert ids == [data._dataset("train")[k]["id"] for k in range(len(ids))]
    assert sorted(ids) == sorted(shuffled) and ids != shuffled
    assert isinstance(data.train_dataloader().sampler, EpochShuffleSampler)


def test_caption_eval_loaders_under_ddp_evaluate_every_sample_exactly_once(monkeypatch) -> None:
    from torch.utils.data import DistributedSampler, SequentialSampler

    assert isinstance(tiny_data(num_val=5).val_dataloader().sampler, SequentialSampler)  # one process
    for split, size in (("val", 5), ("test", 7)):
        shares, ids = [], []
        for rank in (0, 1):
            dm = tiny_data(num_val=5, num_test=7, batch_size=2)
            monkeypatch.setattr(dm, "trainer", SimpleNamespace(world_size=2, global_rank=rank))
            loader = getattr(dm, f"{split}_dataloader")()
            assert isinstance(loader.sampler, DistributedSampler)  # kept by Lightning, not padded
            shares.append(list(loader.sampler))
            ids += [i for b in loader for i in b["id"]]
        assert sorted(shares[0] + shares[1]) == list(range(size)) and not set(shares[0]) & set(shares[1])
        assert len(ids) == size and len(set(ids)) == size  # no caption twice, none left out


def test_eval_loss_is_the_sample_weighted_mean_of_uneven_batches() -> None:
    from lightning_modules.metrics import eval_loss_means, log_eval_loss

    logged = {}
    module = SimpleNamespace(log=lambda name, value, **kw: logged.update({name: value}))
    module.val_loss_mean, module.test_loss_mean = eval_loss_means()
    for loss, size in ((1.0, 8), (4.0, 1)):  # batches of 8 and 1: weighted mean 12 / 9
        log_eval_loss(module, "val", torch.tensor(loss), size)
    assert logged["val/loss"] is module.val_loss_mean
    assert module.val_loss_mean.compute().item() == pytest.approx(12 / 9)
