"""Method-specific tests of the additive / factorised methods: VPT, adapters, Convpass, SSF, FacT, TSA."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from peft_methods import SSF, TSA, VPT, Adapter, AdaptFormer, Convpass, FacT
from peft_methods.base import count_params, keep_frozen_in_eval, trainable_state_dict

D, L, MLP = 192, 12, 768  # vit_tiny width, depth, MLP width
HEAD = D * 3 + 3


def tiny_vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=kw.pop("img_size", 32), num_classes=3, **kw
    ).eval()


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=3).eval()


def images(size: int | tuple[int, int] = 32, n: int = 2) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(1))


def trainable(model: nn.Module) -> int:
    return count_params(model)[0]


def randomise(model: nn.Module, prefix: str) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and any(part.startswith(prefix) for part in name.split(".")):
                p.add_(0.1 * torch.randn_like(p))


# ------------------------------------------------------------------ counts
VIT_B_COUNTS = [
    (VPT(), 7_680),
    (VPT(deep=True), 92_160),
    (Adapter(style="houlsby"), 2_379_264),
    (Adapter(style="pfeiffer"), 1_779_840),
    (AdaptFormer(), 1_189_632),
    (Convpass(), 327_552),
    (SSF(), 205_824),
    (FacT(kind="tt"), 21_504),
    (FacT(kind="tk"), 86_528),
]


@pytest.mark.parametrize(("method", "expected"), VIT_B_COUNTS, ids=[repr(m) for m, _ in VIT_B_COUNTS])
def test_vit_base_counts_match_the_spec(method, expected):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=0, pretrained=False)
    assert trainable(method.apply(model)) == expected


def _convpass(c: int) -> int:
    return D * c + c + 9 * c * c + c + c * D + D


TINY_VIT_FORMULAS = [
    (VPT(num_tokens=5), 5 * D),
    (VPT(num_tokens=5, deep=True), L * 5 * D),
    (Adapter(), 2 * L * (2 * D * 64 + 64 + D)),
    (Adapter(style="pfeiffer"), L * (2 * D * (D // 8) + D // 8 + D)),
    (Adapter(style="pfeiffer", bottleneck=7, activation="relu"), L * (2 * D * 7 + 7 + D)),
    (AdaptFormer(bottleneck=16), L * (2 * D * 16 + 16 + D)),
    (Convpass(dim=4), 2 * L * _convpass(4)),
    (SSF(), 2 * (D + L * (D + 3 * D + D + D + MLP + D) + D)),
    (FacT(rank=4), 2 * D * 4 + L * (3 + 1 + 4 + 4) * 4 * 4),
    (FacT(kind="tk", rank=6), 2 * D * 6 + 6**3 + 6 * 12 * L),
]


@pytest.mark.parametrize(("method", "expected"), TINY_VIT_FORMULAS, ids=repr)
def test_tiny_vit_counts_follow_the_formula(method, expected):
    assert trainable(method.apply(tiny_vit())) == expected + HEAD


def test_tiny_cnn_counts_follow_the_formula():
    stock = tiny_cnn()
    convs = [m for m in stock.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in stock.modules() if isinstance(m, nn.BatchNorm2d)]
    head = 512 * 3 + 3
    ssf = 2 * (sum(c.out_channels for c in convs) + sum(n.num_features for n in norms))
    assert trainable(SSF().apply(tiny_cnn())) == ssf + head
    tsa = sum(c.out_channels * c.in_channels for c in convs if c.kernel_size == (3, 3))
    assert tsa == 1_220_608
    assert trainable(TSA().apply(tiny_cnn())) == tsa + head


# ------------------------------------------------------------------ VPT
@pytest.mark.parametrize("deep", [False, True])
def test_vpt_prompts_reach_the_last_block_and_learn(deep):
    model = VPT(num_tokens=3, deep=deep).apply(tiny_vit())
    seen: list[torch.Size] = []
    model.blocks[-1].register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    F.cross_entropy(model(images()), torch.tensor([0, 2])).backward()
    assert seen == [torch.Size([2, 1 + 4 + 3, D])]  # prefix + 2x2 patches + prompts
    prompts = [p for n, p in model.named_parameters() if n.endswith("vpt_prompt")]
    assert len(prompts) == (L if deep else 1)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts)


def test_vpt_deep_replaces_the_prompt_slots_before_each_block():
    model = VPT(num_tokens=3, deep=True).apply(tiny_vit())
    inputs: dict[int, torch.Tensor] = {}
    for i in (1, L - 1):
        model.blocks[i].base_layer.register_forward_pre_hook(lambda _m, a, i=i: inputs.setdefault(i, a[0]))
    model(images())
    for i, x in inputs.items():
        torch.testing.assert_close(x[:, 1:4], model.blocks[i].vpt_prompt.expand(2, -1, -1))


def test_vpt_prompts_are_excluded_from_pooling():
    model = VPT(num_tokens=3).apply(tiny_vit(global_pool="avg"))
    feats = model.forward_features(images())
    assert feats.shape == (2, 1 + 4, D)  # prompts removed after the final norm
    pooled = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(pooled, model.fc_norm(feats[:, 1:].mean(dim=1)))
    token = VPT(num_tokens=3).apply(tiny_vit())
    feats = token.forward_features(images())
    torch.testing.assert_close(token.forward_head(feats, pre_logits=True), feats[:, 0])


def test_vpt_keeps_the_frozen_backbone_in_eval_mode():
    model = VPT(deep=True).apply(tiny_vit(drop_path_rate=0.2, proj_drop_rate=0.2, attn_drop_rate=0.2))
    model.train()
    keep_frozen_in_eval(model)
    x = images()
    torch.testing.assert_close(model(x), model(x))  # no dropout / drop-path active anywhere


def test_vpt_prompt_init_bound():
    model = VPT(num_tokens=50).apply(tiny_vit())
    bound = (6 / (3 * 16 * 16 + D)) ** 0.5
    prompt = model.norm_pre.vpt_prompt
    assert prompt.abs().max() <= bound and prompt.abs().max() > 0.9 * bound


# ------------------------------------------------------------------ adapters and Convpass
@pytest.mark.parametrize(
    ("method", "branch"),
    [
        (Adapter(), "adapter_attn"),
        (Adapter(style="pfeiffer"), "adapter_mlp"),
        (AdaptFormer(), "adaptformer_mlp"),
        (Convpass(), "convpass_attn"),
    ],
    ids=repr,
)
def test_bottlenecks_start_at_zero_output_but_learn(method, branch):
    base = tiny_vit()
    model = method.apply(copy.deepcopy(base))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))  # identity at init
    module = getattr(model.blocks[0], branch)
    assert module.down.weight.abs().sum() > 0 and module.up.weight.abs().sum() == 0
    model.train()
    keep_frozen_in_eval(model)
    F.cross_entropy(model(x), torch.tensor([0, 2])).backward()
    # Down is non-zero, so Up's weight (not only its bias) gets a gradient at the first step.
    assert module.up.weight.grad.abs().sum() > 0


def test_adapter_styles_place_their_adapters():
    houlsby = Adapter().apply(tiny_vit())
    pfeiffer = Adapter(style="pfeiffer").apply(tiny_vit())
    assert houlsby.blocks[0].adapter_attn is not None and pfeiffer.blocks[0].adapter_attn is None
    assert pfeiffer.blocks[0].adapter_mlp.down.out_features == D // 8
    # The stock weights keep their state-dict keys.
    assert set(tiny_vit().state_dict()) <= set(houlsby.state_dict())


@pytest.mark.parametrize("img_size", [48, (32, 64)])
def test_convpass_uses_the_model_patch_grid(img_size):
    base = tiny_vit(img_size=img_size, reg_tokens=2)
    model = Convpass().apply(copy.deepcopy(base))
    grids: list[torch.Size] = []
    model.blocks[0].convpass_attn.conv.register_forward_hook(lambda _m, _i, out: grids.append(out.shape[-2:]))
    with torch.no_grad():
        randomise(model, "convpass_")
        out = model(images(img_size))
    expected = (3, 3) if img_size == 48 else (2, 4)
    assert grids == [torch.Size(expected), torch.Size([1, 1])]  # patch grid, then prefix tokens as 1x1
    assert out.shape == (2, 3) and not torch.allclose(out, base(images(img_size)))


def test_convpass_prefix_tokens_use_only_the_centre_tap():
    bypass = Convpass(dim=4).apply(tiny_vit()).blocks[0].convpass_attn
    with torch.no_grad():
        bypass.conv.weight.normal_()
        h = torch.randn(3, 4, 1, 1)
        expected = F.linear(h.flatten(1), bypass.conv.weight[:, :, 1, 1], bypass.conv.bias)
        torch.testing.assert_close(bypass.conv(h).flatten(1), expected)


# ------------------------------------------------------------------ mergeable methods
MERGE_CASES = [
    (SSF, {}, tiny_vit, "ssf_"),
    (SSF, {}, tiny_cnn, "ssf_"),
    (FacT, {"kind": "tt"}, tiny_vit, "fact_"),
    (FacT, {"kind": "tk"}, tiny_vit, "fact_"),
    (TSA, {}, tiny_cnn, "tsa_"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "build", "prefix"),
    MERGE_CASES,
    ids=[f"{c.__name__}{kw.get('kind', '')}-{b.__name__}" for c, kw, b, _ in MERGE_CASES],
)
def test_merge_is_exact_and_restores_the_plain_backbone(cls, kwargs, build, prefix):
    stock = build()
    model = cls(**kwargs).apply(copy.deepcopy(stock))
    randomise(model, prefix)
    model.eval()
    x = images()
    with torch.no_grad():
        before = model(x)
        merged = cls(**kwargs).merge(model)
        after = merged(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert list(merged.state_dict()) == list(stock.state_dict())
    assert count_params(merged)[1] == count_params(stock)[1]


def test_ssf_is_not_identity_at_init():
    assert SSF.identity_at_init is False and VPT.identity_at_init is False
    assert FacT.identity_at_init and TSA.identity_at_init and Adapter.identity_at_init
    base = tiny_vit()
    model = SSF().apply(copy.deepcopy(base))
    with torch.no_grad():
        assert not torch.allclose(model(images()), base(images()), atol=1e-5)


def test_ssf_merge_refuses_a_shift_it_cannot_fold():
    model = SSF().apply(tiny_vit(qkv_bias=False))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv.*no bias"):
        SSF().merge(model)


def test_fact_shares_u_and_v_once_in_the_state_dict():
    model = FacT().apply(tiny_vit())
    keys = [k for k in model.state_dict() if k.startswith("fact_factors.")]
    assert keys == ["fact_factors.u", "fact_factors.v"]
    assert torch.count_nonzero(model.fact_factors.v) == 0
    saved = trainable_state_dict(model)
    assert sum(k.startswith("fact_factors.") for k in saved) == 2
    assert FacT().config()["init_args"] == {"kind": "tt", "rank": 8, "scale": 1.0, "dropout": 0.1}
    assert FacT(kind="tk").hparams == {"kind": "tk", "rank": 32, "scale": 0.1, "dropout": 0.1}


def test_tsa_skips_unaligned_convs_and_refuses_to_merge_same_padding():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=0),  # its 1x1 branch would have another grid: left alone
        Conv2dSame(4, 6, 3, stride=2),
    )
    TSA().apply(model)
    assert trainable(model) == 4 * 3 + 6 * 4
    with torch.no_grad():
        model[2].tsa_alpha.normal_()
    assert model(torch.randn(1, 3, 9, 9)).shape == (1, 6, 4, 4)
    with pytest.raises(ValueError, match=r"TSA\.merge cannot fold the adapters of 2"):
        TSA().merge(model)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("cls", [VPT, Adapter, AdaptFormer, Convpass, FacT])
def test_vit_only_methods_reject_cnns(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__} does not support backbone 'resnet18'"):
        cls().apply(tiny_cnn())


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "swin_tiny_patch4_window7_224", "convnext_tiny"])
def test_ssf_rejects_transformer_layouts_it_would_adapt_only_in_part(name):
    """BEiT / Swin blocks (and ConvNeXt-T's Linear MLP) are not the ViT layout SSF targets; the CNN
    rule would wrap only their convolutions and norms and leave every Linear layer bare."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match=rf"SSF does not support backbone '{name}': its Linear layer '[\w.]+' would"):
        SSF().apply(model)


def test_ssf_still_takes_vits_and_cnns_whole():
    vit, cnn = tiny_vit(), tiny_cnn()
    for model in (vit, cnn):
        assert SSF().unsupported_reason(model) is None
    linear = [n for n, m in vit.named_modules() if isinstance(m, nn.Linear) and not n.startswith("head")]
    SSF().apply(vit)
    wrapped = {n.removesuffix(".base_layer") for n, m in vit.named_modules() if isinstance(m, nn.Linear)}
    assert len(linear) == 4 * len(vit.blocks) and wrapped - {"head"} == {f"{n}" for n in linear}
    assert all(type(vit.get_submodule(n)).__name__ == "ScaleShift" for n in linear)


def test_tsa_rejects_vits():
    with pytest.raises(ValueError, match=r"TSA does not support backbone 'vit_tiny_patch16_224'.*3x3"):
        TSA().apply(tiny_vit())


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: VPT(num_tokens=0), "num_tokens must be a positive integer"),
        (lambda: FacT(rank=0), "rank must be a positive integer"),
        (lambda: FacT(kind="cp"), "kind='cp' is not supported"),
        (lambda: Adapter(style="parallel"), "style='parallel' is not supported"),
        (lambda: Adapter(bottleneck=-1), "bottleneck must be a positive integer"),
        (lambda: AdaptFormer(bottleneck=0), "bottleneck must be a positive integer"),
        (lambda: Convpass(dim=0), "dim must be a positive integer"),
    ],
)
def test_bad_arguments_raise_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()
