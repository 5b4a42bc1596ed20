"""The invariant suite: every method in ALL_METHODS on a tiny ViT and a tiny CNN.

Checks, for each (method, backbone): support is decided with a clear error; only intended
parameters train; zero-init methods equal the frozen base at init; one optimizer step changes only
trainable tensors; merged == unmerged (fp32, atol 1e-5) with the original keys and parameter count;
every trainable parameter gets a gradient (DDP with find_unused_parameters=False); gradient
checkpointing gives the same loss and gradients; trainable state round-trips onto a fresh backbone.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import timm
import torch
import torch.nn.functional as F

import peft_methods
from peft_methods import ALL_METHODS, count_params
from peft_methods.base import (
    PeftMethod,
    build_method,
    head_param_names,
    keep_frozen_in_eval,
    trainable_state_dict,
)
from peft_methods.selective import FullFineTuning, _Selective

BUILDERS = {
    "vit": lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3),
    "cnn": lambda: timm.create_model("resnet18", num_classes=3),
}
_BASE: dict[str, dict[str, torch.Tensor]] = {}
CASES = list(itertools.product(ALL_METHODS, BUILDERS))
IDS = [f"{cls.__name__}-{kind}" for cls, kind in CASES]


def fresh(kind: str) -> torch.nn.Module:
    """The same pretrained-like backbone every time (random but fixed weights), in eval mode."""
    if kind not in _BASE:
        torch.manual_seed(0)
        _BASE[kind] = copy.deepcopy(BUILDERS[kind]().state_dict())
    model = BUILDERS[kind]()
    model.load_state_dict(_BASE[kind])
    return model.eval()


def inputs(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.tensor([0, 2, 1, 0][:n])


def applied(cls: type[PeftMethod], kind: str) -> tuple[PeftMethod, torch.nn.Module]:
    method = cls()
    model = fresh(kind)
    if method.unsupported_reason(model) is not None:
        pytest.skip(f"{cls.__name__} does not apply to {kind}")
    torch.manual_seed(3)  # the method's own random init, identical for every call
    return method, method.apply(model).eval()


def perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Moves every trainable tensor away from its init, deterministically."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def own_names(method: PeftMethod, model: torch.nn.Module) -> set[str]:
    """What the method should train besides the head."""
    names = {n for n, _ in model.named_parameters()}
    if isinstance(method, FullFineTuning):
        return names
    if isinstance(method, _Selective):
        return set(method.select(model))
    prefix = method.param_prefix
    return {n for n in names if prefix and any(part.startswith(prefix) for part in n.split("."))}


@pytest.mark.parametrize(("cls", "kind"), CASES, ids=IDS)
def test_support_is_decided_with_a_clear_error(cls: type[PeftMethod], kind: str) -> None:
    method, model = cls(), fresh(kind)
    reason = method.unsupported_reason(model)
    if reason is None:
        method.apply(model)
        return
    with pytest.raises(ValueError, match=model.pretrained_cfg["architecture"]) as info:
        method.apply(fresh(kind))
    assert cls.__name__ in str(info.value)


@pytest.mark.parametrize(("cls", "kind"), CASES, ids=IDS)
def test_only_intended_parameters_train(cls: type[PeftMethod], kind: str) -> None:
    method, model = applied(cls, kind)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = own_names(method, model) | head_param_names(model)
    assert trainable == expected
    assert head_param_names(model) <= trainable, "the task head must train"
    if cls.__name__ != "LinearProbe":
        assert trainable - head_param_names(model), "the method trains nothing of its own"


@pytest.mark.parametrize(("cls", "kind"), CASES, ids=IDS)
def test_identity_at_init(cls: type[PeftMethod], kind: str) -> None:
    if not getattr(cls, "identity_at_init", True):
        pytest.skip(f"{cls.__name__} is not identity at init by definition")
    x, _ = inputs()
    base = fresh(kind)
    _, model = applied(cls, kind)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("cls", "kind"), CASES, ids=IDS)
def test_one_step_changes_only_trainable_tensors(cls: type[PeftMethod], kind: str) -> None:
    method, model = applied(cls, kind)
    model.train()
    keep_frozen_in_eval(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = inputs(4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # two steps: zero-init factors (LoRA B) let the others move on step 2
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        if not p.requires_grad:
            assert not changed, f"frozen {name} changed"
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert moved, "no trainable tensor moved"


@pytest.mark.parametrize(("cls", "kind"), CASES, ids=IDS)
def test_every_trainable_parameter_gets_a_gradient(cls: type[PeftMethod], kind: str) -> None:
    _, model = applied(cls, kind)
    model.train()
    keep_frozen_in_eval(model)
    x, y = inputs(4)
    F.cross_entropy(model(x), y).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient (DDP find_unused_parameters=False would fail): {missing[:5]}"


@pytest.mark.parametrize(("cls", "kind"), CASES, ids=IDS)
def test_merge_is_exact_and_plain(cls: type[PeftMethod], kind: str) -> None:
    method = cls()
    if not cls.mergeable:
        _, model = applied(cls, kind)
        with pytest.raises(ValueError, match="cannot be merged"):
            method.merge(model)
        return
    method, model = applied(cls, kind)
    perturb(model)
    x, _ = inputs()
    with torch.no_grad():
        unmerged = model(x)
        merged_model = method.merge(model).eval()
        merged = merged_model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    reference = fresh(kind)
    assert list(merged_model.state_dict()) == list(reference.state_dict())
    assert count_params(merged_model)[1] == count_params(reference)[1]


@pytest.mark.parametrize(("cls", "kind"), CASES, ids=IDS)
def test_gradient_checkpointing_gives_same_loss_and_grads(cls: type[PeftMethod], kind: str) -> None:
    x, y = inputs(4)
    results = []
    for checkpointing in (False, True):
        method, model = applied(cls, kind)
        perturb(model)
        model.set_grad_checkpointing(checkpointing)
        model.train()
        keep_frozen_in_eval(model)
        for m in model.modules():  # no dropout randomness: compare the computation only
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(("cls", "kind"), CASES, ids=IDS)
def test_trainable_state_round_trips_onto_a_fresh_backbone(cls: type[PeftMethod], kind: str) -> None:
    method, model = applied(cls, kind)
    perturb(model)
    state = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    rebuilt_method = build_method(method.config())
    assert rebuilt_method == method
    rebuilt = rebuilt_method.apply(fresh(kind)).eval()
    result = rebuilt.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert set(state) <= set(rebuilt.state_dict())
    x, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=0, rtol=0)


def test_all_methods_are_exported_and_distinct() -> None:
    assert len(set(ALL_METHODS)) == len(ALL_METHODS)
    for cls in ALL_METHODS:
        assert getattr(peft_methods, cls.__name__) is cls
        assert cls().config()["class_path"] == f"peft_methods.{cls.__name__}"
    # DoRA is LoRA plus a magnitude vector and keeps peft's lora_ names; every other prefix is unique.
    prefixes = [c.param_prefix for c in ALL_METHODS if c.param_prefix and c.__name__ != "DoRA"]
    assert len(prefixes) == len(set(prefixes)), "parameter prefixes must be unique per method"


# ---------------------------------------------------------------- selective methods: exact counts
VIT_B_COUNTS = {  # ../shared/METHODS.md, vit_base_patch16_224 with num_classes=0
    "FullFineTuning": 85_798_656,
    "LinearProbe": 0,
    "BitFit": 102_912,
    "NormTuning": 38_400,
    "AttentionTuning": 28_348_416,
}


@pytest.mark.parametrize("name", sorted(VIT_B_COUNTS))
def test_selective_counts_on_vit_base(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=0)
    getattr(peft_methods, name)().apply(model)
    assert count_params(model)[0] == VIT_B_COUNTS[name]


def test_selective_counts_follow_their_definitions_on_a_cnn() -> None:
    model = fresh("cnn")
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("fc."))
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    norm_params = sum(m.weight.numel() + m.bias.numel() for m in bn)
    conv_bias = sum(m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None)
    assert count_params(peft_methods.NormTuning().apply(fresh("cnn")))[0] == norm_params + head
    assert count_params(peft_methods.BitFit().apply(fresh("cnn")))[0] == sum(m.bias.numel() for m in bn) + conv_bias + head
    with pytest.raises(ValueError, match="resnet18.*attention"):
        peft_methods.AttentionTuning().apply(fresh("cnn"))


def test_frozen_batchnorm_and_dropout_stay_in_eval_mode() -> None:
    model = peft_methods.LinearProbe().apply(fresh("cnn")).train()
    keep_frozen_in_eval(model)
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model = peft_methods.NormTuning().apply(fresh("cnn")).train()
    keep_frozen_in_eval(model)
    assert all(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, drop_path_rate=0.1)
    peft_methods.LinearProbe().apply(vit).train()
    keep_frozen_in_eval(vit)
    from timm.layers import DropPath

    drop_paths = [m for m in vit.modules() if isinstance(m, DropPath)]
    assert drop_paths and not any(m.training for m in drop_paths)


def test_unknown_method_class_path_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="Unknown PEFT method 'peft_methods.Nope'.*BitFit"):
        build_method({"class_path": "peft_methods.Nope"})
