"""The peft-library methods (LoRA, DoRA, LoHa, LoKr, OFT, BOFT, IA3, VeRA): counts, targets, merges.

The generic invariants (identity at init, gradients, merge, round trip) run in test_peft_methods.py;
here: exact counts on ViT-B, target resolution (q/v slices, proj never patch_embed.proj, CNN and
UNet defaults), init values, and the errors.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_methods import BOFT, IA3, OFT, DoRA, LoHa, LoKr, LoRA, VeRA, count_params
from peft_methods.base import keep_frozen_in_eval, trainable_state_dict
from peft_methods.qkv_split import QKVSplit

PEFT_LIB_METHODS = (LoRA, DoRA, LoHa, LoKr, OFT, BOFT, IA3, VeRA)
# Trainable counts on timm vit_base_patch16_224, num_classes=0, from each method's definition.
VIT_B_COUNTS = {
    LoRA: 2 * 12 * (8 * 768 + 768 * 8),  # q and v: A (r x d) + B (d x r) = 294,912
    DoRA: 12 * (8 * 768 + 3 * 768 * 8 + 3 * 768),  # fused qkv: A, B, magnitude = 322,560
    LoHa: 2 * 12 * 2 * (768 * 8 + 8 * 768),  # two low-rank pairs on q and v
    OFT: 2 * 12 * (768 // 32) * (32 * 31 // 2),  # skew-symmetric 32x32 blocks on q and v
    BOFT: 2 * 12 * ((768 // 4) * 4 * 4 + 768),  # 4x4 blocks + output scale on q and v
    IA3: 12 * (768 + 768 + 3072),  # k, v outputs and the fc2 input
    VeRA: 2 * 12 * (256 + 768),  # d (r) and b (d_out) on q and v
}


_MODELS: dict[str, nn.Module] = {}


def _fixed(name: str, **kwargs: object) -> nn.Module:
    """The same random-weight backbone every call (built once, then copied: creation is slow)."""
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = timm.create_model(name, num_classes=3, **kwargs).eval()
    return copy.deepcopy(_MODELS[name])


def vit() -> nn.Module:
    return _fixed("vit_tiny_patch16_224", img_size=32)


def cnn() -> nn.Module:
    return _fixed("resnet18")


def tuner_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def x32() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cls", list(VIT_B_COUNTS), ids=lambda c: c.__name__)
def test_counts_on_vit_base(cls: type) -> None:
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=0)
    cls().apply(model)
    assert count_params(model)[0] == VIT_B_COUNTS[cls]
    assert VIT_B_COUNTS[LoRA] == 294_912 and VIT_B_COUNTS[DoRA] == 322_560  # METHODS.md


def test_lora_adapts_only_the_q_and_v_slices_and_merges_back_to_the_fused_qkv() -> None:
    base = vit()
    model = LoRA().apply(copy.deepcopy(base))
    assert isinstance(model.blocks[0].attn.qkv, QKVSplit)
    assert tuner_paths(model) == [f"blocks.{i}.attn.qkv.{s}" for i in range(12) for s in "qv"]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    tokens = torch.randn(2, 5, 192)
    d = 192
    with torch.no_grad():
        fused, split = base.blocks[0].attn.qkv(tokens), model.blocks[0].attn.qkv(tokens)
        torch.testing.assert_close(split[..., d:2 * d], fused[..., d:2 * d], atol=1e-6, rtol=0)  # k untouched
        assert not torch.allclose(split[..., :d], fused[..., :d], atol=1e-4)  # q adapted
        assert not torch.allclose(split[..., 2 * d:], fused[..., 2 * d:], atol=1e-4)  # v adapted
        unmerged = model(x32())
        merged_model = LoRA().merge(model)
        merged = merged_model(x32())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    qkv = merged_model.blocks[0].attn.qkv
    assert type(qkv) is nn.Linear and qkv.weight.shape == (3 * d, d)
    assert torch.equal(qkv.weight[d:2 * d], base.blocks[0].attn.qkv.weight[d:2 * d])
    assert list(merged_model.state_dict()) == list(base.state_dict())
    assert count_params(merged_model)[1] == count_params(base)[1]
    assert not hasattr(merged_model, "peft_config")


def test_proj_target_never_hits_patch_embed_proj() -> None:
    model = LoRA(targets=["proj"]).apply(vit())
    assert tuner_paths(model) == [f"blocks.{i}.attn.proj" for i in range(12)]
    assert type(model.patch_embed.proj) is nn.Conv2d
    for name in ("qkv", "fc1", "fc2"):
        assert tuner_paths(LoRA(targets=[name]).apply(vit()))[0].endswith(name)


def test_trainability_contract_and_deterministic_names() -> None:
    for cls in PEFT_LIB_METHODS:
        a, b = cls().apply(vit()), cls().apply(vit())
        trainable = {n for n, p in a.named_parameters() if p.requires_grad}
        head = {"head.weight", "head.bias"}
        assert head <= trainable, f"{cls.__name__}: the head must train"
        assert all(cls.param_prefix in n for n in trainable - head), cls.__name__
        assert list(trainable_state_dict(a)) == list(trainable_state_dict(b))
        assert list(a.state_dict()) == list(b.state_dict())


def test_init_values_make_every_method_the_identity() -> None:
    x = x32()
    with torch.no_grad():
        reference = vit()(x)
    for cls in PEFT_LIB_METHODS:
        model = cls().apply(vit())
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
    params = dict(IA3().apply(vit()).named_parameters())
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in params.items() if "ia3_l" in n)
    params = dict(LoRA().apply(vit()).named_parameters())
    assert all(not p.any() for n, p in params.items() if "lora_B" in n)
    params = dict(VeRA().apply(vit()).named_parameters())
    assert all(not p.any() for n, p in params.items() if "vera_lambda_b" in n)
    oft_layer = OFT().apply(vit()).blocks[0].attn.qkv.q
    rotation = oft_layer.oft_R["default"]
    blocks = rotation._cayley_batch(rotation.weight, rotation.block_size, False)
    torch.testing.assert_close(blocks, torch.eye(32).expand_as(blocks), atol=0, rtol=0)


def test_cnn_default_targets_the_stage_convs_not_the_stem() -> None:
    model = cnn()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"}
    lora = LoRA().apply(cnn())
    assert tuner_paths(lora) == list(convs)
    expected = sum(8 * m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels * 8 for m in convs.values())
    assert count_params(lora)[0] == expected + 512 * 3 + 3
    layer = lora.layer1[0].conv2
    assert layer.lora_A["default"].kernel_size == (3, 3) and layer.lora_B["default"].kernel_size == (1, 1)
    one_by_one = [n for n, m in convs.items() if m.kernel_size == (1, 1)]
    assert tuner_paths(OFT().apply(cnn())) == one_by_one  # k x k convs: peft's OFT is not exact
    assert tuner_paths(BOFT().apply(cnn())) == one_by_one
    assert tuner_paths(LoRA(targets=["conv2"]).apply(cnn())) == [n for n in convs if n.endswith("conv2")]
    with pytest.raises(ValueError, match=r"VeRA does not support backbone 'resnet18'.*Linear"):
        VeRA().apply(cnn())


def test_unet_default_targets_attention_projections_with_alpha_equal_r() -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    )
    targets = {n: m for n, m in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    model = LoRA(r=4, alpha=4).apply(copy.deepcopy(unet))
    assert tuner_paths(model) == list(targets)
    assert count_params(model)[0] == sum(4 * (m.in_features + m.out_features) for m in targets.values())
    assert all(m.scaling["default"] == 1.0 for n, m in model.named_modules() if n in targets)
    sample, t, text = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(sample, t, text).sample, unet(sample, t, text).sample, atol=1e-5, rtol=0)


def test_errors_name_the_method_the_backbone_and_the_valid_targets() -> None:
    with pytest.raises(ValueError, match=r"LoRA on backbone 'vit_tiny_patch16_224'.*'nope'.*q, k, v, qkv, proj, fc1, fc2"):
        LoRA(targets=["nope"]).apply(vit())
    with pytest.raises(ValueError, match=r"DoRA on backbone 'resnet18'.*'q'.*conv1, conv2, downsample.0"):
        DoRA(targets=["q"]).apply(cnn())
    with pytest.raises(ValueError, match="mix the fused 'qkv'"):
        LoRA(targets=["qkv", "q"]).apply(vit())
    for bad in (dict(r=0), dict(r=-1), dict(alpha=0), dict(dropout=1.0)):
        with pytest.raises(ValueError, match="LoRA needs"):
            LoRA(**bad)
    for cls, bad in ((LoHa, dict(r=0)), (LoKr, dict(r=0)), (OFT, dict(block_size=0)), (VeRA, dict(r=0))):
        with pytest.raises(ValueError, match=f"{cls.__name__} needs"):
            cls(**bad)
    with pytest.raises(ValueError, match="non-empty list"):
        LoRA(targets=[])
    with pytest.raises(ValueError, match="IA3 feedforward entries"):
        IA3(targets=["k", "v"], feedforward=["fc2"]).apply(vit())
    with pytest.raises(ValueError, match="already has peft adapter layers"):
        DoRA().apply(LoRA().apply(vit()))


def test_adapter_dropout_trains_while_the_frozen_backbone_stays_in_eval() -> None:
    model = LoRA(dropout=0.1).apply(cnn()).train()
    keep_frozen_in_eval(model)
    assert model.layer1[0].conv1.lora_dropout["default"].training
    assert not model.layer1[0].bn1.training


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_boft_with_butterfly_factors_fails_without_peft_kernel() -> None:
    from peft.tuners.boft.layer import get_fbd_cuda

    if get_fbd_cuda():
        pytest.skip("peft's fbd_cuda kernel is available here")
    with pytest.raises(ValueError, match="n_butterfly_factor=1"):
        BOFT(n_butterfly_factor=2).apply(vit())
