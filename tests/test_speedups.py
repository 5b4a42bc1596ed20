"""Every speed-up gives the results of the slow path (equal, or allclose in fp32); no timings here."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import (
    RoundBudget,
    Timings,
    adjacent_ratios,
    interleaved,
    paired_ratio,
    peft_configs,
    ratio,
    seconds,
)
from benchmarks.report import TARGETS, config_table, evaluate
from benchmarks.steps import NO_WEIGHT_GRAD
from lightning_modules import ImageClassifier
from lightning_modules.allocator import keep_freed_memory, runs_glibc
from lightning_modules.feature_cache import FrozenFeatureCache, image_key
from lightning_modules.speedups import (
    EXPLICIT_ATTENTION_MAX_TOKENS,
    can_fuse_adamw,
    prefers_fused_attention,
    set_fused_attention,
    uses_fused_attention,
)
from peft_methods import SSF, VPT, LinearProbe, LoRA
from peft_methods.base import trainable_state_dict

VIT = dict(backbone="vit_tiny_patch16_224", image_size=32)
CNN = dict(backbone="resnet18", image_size=32)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from two, and the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def module(peft=None, seed: int = 0, **kwargs) -> ImageClassifier:
    torch.manual_seed(seed)
    args = {**VIT, "num_classes": 3, "pretrained": False, "export_adapter": False, **kwargs}
    return ImageClassifier(peft=peft, **args)


def images(n: int = 4, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def loss_and_grads(m: ImageClassifier, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m.train()
    m.zero_grad(set_to_none=True)
    loss = F.cross_entropy(m(x), torch.arange(len(x)) % 3)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------- attention kernel
def test_explicit_attention_gives_the_fused_results_and_is_chosen_on_cpu_in_bf16_only() -> None:
    fused, explicit = module(LoRA()), module(LoRA())
    explicit.load_state_dict(fused.state_dict())
    assert set_fused_attention(fused.model, True) == 12
    explicit.select_attention("cpu", "bf16-mixed")
    assert not any(getattr(m, "fused_attn", False) for m in explicit.model.modules())
    assert not uses_fused_attention(explicit.model) and uses_fused_attention(fused.model)
    assert not uses_fused_attention(module(LoRA(), **CNN).model)  # no attention at all
    (la, ga), (lb, gb) = loss_and_grads(fused, images()), loss_and_grads(explicit, images())
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4, msg=name)
    model = explicit.model
    assert not prefers_fused_attention(model, "cpu", "bf16-mixed")
    for device, precision in (("cpu", "32-true"), ("cpu", None), ("cpu", "bf16-true"), ("cuda", "bf16-mixed"),
                              ("cuda", "32-true")):
        assert prefers_fused_attention(model, device, precision), (device, precision)
    explicit.select_attention("cpu", "32-true")
    assert uses_fused_attention(explicit.model)
    long = module(LoRA(), image_size=16 * 20)  # 20 x 20 patches + cls > EXPLICIT_ATTENTION_MAX_TOKENS
    assert 20 * 20 + 1 > EXPLICIT_ATTENTION_MAX_TOKENS and prefers_fused_attention(long.model, "cpu", "bf16-mixed")
    forced = module(LoRA(), fused_attention=True)
    forced.select_attention("cpu", "bf16-mixed")
    assert uses_fused_attention(forced.model)
    forced = module(LoRA(), fused_attention=False)
    forced.select_attention("cpu", "32-true")
    assert not uses_fused_attention(forced.model)


@pytest.mark.parametrize(("precision", "fused"), [("32-true", True), ("bf16-mixed", False)])
def test_trainer_setup_selects_the_attention_kernel_for_its_precision(tmp_path: Path, precision: str, fused: bool) -> None:
    from datamodules import SyntheticDataModule

    m = module(LinearProbe())
    set_fused_attention(m.model, not fused)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, precision=precision)
    data = SyntheticDataModule(num_train=8, num_val=4, num_test=4, image_size=32, batch_size=4, num_workers=0)
    trainer.fit(m, data)
    assert uses_fused_attention(m.model) is fused
    assert any(isinstance(getattr(mod, "fused_attn", None), bool) for mod in m.model.modules())


# ---------------------------------------------------------------------- channels_last
def test_channels_last_cnn_gives_the_same_results_and_checkpoints() -> None:
    plain, nhwc = module(LoRA(), **CNN), module(LoRA(), channels_last=True, **CNN)
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc.preprocess(images()).is_contiguous(memory_format=torch.channels_last)
    (la, ga), (lb, gb) = loss_and_grads(plain, images()), loss_and_grads(nhwc, images())
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # as after training: adapters away from their zero init
        for p in nhwc.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    state = trainable_state_dict(nhwc.model)  # what checkpoints hold: loads into a contiguous model
    fresh = module(LoRA(), **CNN)
    fresh.model.load_state_dict(state, strict=False)
    nhwc.eval(), fresh.eval()
    torch.testing.assert_close(fresh(images()), nhwc(images()), atol=1e-5, rtol=1e-5)
    assert not module(LoRA(), channels_last=True).channels_last  # a ViT: nothing to gain


# ---------------------------------------------------------------------- optimizer
def test_default_adamw_is_fused_and_holds_state_for_trainable_tensors_only() -> None:
    def trained(fused: bool) -> tuple[ImageClassifier, torch.optim.Optimizer]:
        m = module(LoRA(), lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
        opt = m.configure_optimizers()["optimizer"]
        if not fused:
            opt = torch.optim.AdamW(opt.param_groups, lr=1e-3, weight_decay=0.05, fused=False)
        for i in range(3):
            loss_and_grads(m, images(seed=i))
            opt.step()
        return m, opt

    (fast, opt), (slow, _) = trained(True), trained(False)
    assert opt.defaults["fused"] is True and can_fuse_adamw(p for g in opt.param_groups for p in g["params"])
    for (name, a), b in zip(fast.named_parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    trainable = {id(p) for p in fast.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    assert {id(p) for p in opt.state} == trainable
    assert all(p.grad is None for p in fast.parameters() if not p.requires_grad)


# ---------------------------------------------------------------------- no backward through frozen parts
@pytest.mark.parametrize("peft", [LoRA(), VPT(), SSF(), LinearProbe()], ids=lambda p: type(p).__name__)
def test_autograd_records_nothing_before_the_first_trainable_tensor(peft) -> None:
    m = module(peft)
    m.train()
    seen = {}
    m.model.patch_embed.register_forward_hook(lambda mod, i, out: seen.setdefault("patch", out))
    m.model.blocks[0].norm1.register_forward_hook(lambda mod, i, out: seen.setdefault("norm1", out))
    m.model.get_classifier().register_forward_pre_hook(lambda mod, args: seen.setdefault("head_in", args[0]))
    m(images()).sum().backward()
    # The patch embedding's weights are frozen and its input needs no gradient: no backward there.
    # (SSF scales the projection's output inside patch_embed, so its output does need one.)
    assert seen["patch"].requires_grad == isinstance(peft, SSF)
    if isinstance(peft, LinearProbe):  # the whole backbone runs without a graph: forward cost only
        assert seen["head_in"].grad_fn is None and not seen["norm1"].requires_grad


# ---------------------------------------------------------------------- frozen-feature cache
def _epochs(m: ImageClassifier, batches: list[torch.Tensor], order: list[list[int]]) -> list[float]:
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for epoch in order:
        for i in epoch:
            m.train()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(batches[i]), torch.arange(len(batches[i])) % 3)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("shuffled", [False, True])
def test_linear_probe_feature_cache_trains_the_head_like_the_slow_path(shuffled: bool) -> None:
    batches = [images(seed=i) for i in range(3)]
    order = [[0, 1, 2], [2, 0, 1], [1, 2, 0]] if shuffled else [[0, 1, 2]] * 3
    slow, fast = module(LinearProbe()), module(LinearProbe(), cache_features=True)
    fast.load_state_dict(slow.state_dict())
    slow_losses, fast_losses = _epochs(slow, batches, order), _epochs(fast, batches, order)
    cache = fast.feature_cache
    assert len(cache) == 12 and cache.misses == 12 and cache.hits == 24  # backbone ran in epoch 1 only
    if shuffled:  # features computed in another batch composition: equal up to float rounding
        torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(slow_losses), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(fast.model.head.weight, slow.model.head.weight, atol=1e-6, rtol=1e-5)
    else:
        assert fast_losses == slow_losses
        assert torch.equal(fast.model.head.weight, slow.model.head.weight)
    fast.eval(), slow.eval()
    torch.testing.assert_close(fast(images(seed=9)), slow(images(seed=9)), atol=1e-6, rtol=1e-5)


def test_feature_cache_keys_on_pixels_and_refuses_what_it_cannot_cache() -> None:
    x = images(2)
    changed = x.clone()
    changed[1, 0, 0, 0] ^= 1
    assert image_key(x[0]) == image_key(x[0].clone()) and image_key(x[1]) != image_key(changed[1])
    with pytest.raises(ValueError, match=r"cache_features needs a method that trains only the task head.*LoRA"):
        module(LoRA(), cache_features=True)
    # Active dropout before the head makes its input random: the cache steps aside.
    noisy = module(LinearProbe(), cache_features=True, backbone_kwargs={"drop_rate": 0.5})
    noisy.train()
    assert FrozenFeatureCache.stochastic_layers(noisy.model) == ["head_drop"]
    noisy(images())
    assert len(noisy.feature_cache) == 0
    noisy.eval()
    noisy(images())
    assert len(noisy.feature_cache) == 4


def test_feature_cache_skips_augmented_training_batches(tmp_path: Path) -> None:
    from datamodules import SyntheticDataModule

    def fit(augment: bool) -> ImageClassifier:
        m = module(LinearProbe(), cache_features=True)
        data = SyntheticDataModule(num_train=8, num_val=4, num_test=4, image_size=32, batch_size=4,
                                   num_workers=0, augment=augment)
        trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            default_root_dir=tmp_path)
        trainer.fit(m, data)
        return m

    assert len(fit(augment=False).feature_cache) == 12  # 8 train + 4 val images, each computed once
    augmented = fit(augment=True).feature_cache
    assert len(augmented) == 4 and augmented.hits == 4  # only validation images: computed once, reused


# ---------------------------------------------------------------------- compile, SSF dtype
def test_compiled_backbone_gives_the_same_logits_and_state_keys() -> None:
    eager, compiled = module(LoRA()), module(LoRA(), compile={"backend": "eager"})
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    eager.eval(), compiled.eval()
    torch.testing.assert_close(compiled(images()), eager(images()), atol=1e-6, rtol=1e-6)


def test_ssf_keeps_the_wrapped_layer_dtype_under_autocast() -> None:
    m = module(SSF()).eval()
    qkv = m.model.blocks[0].attn.qkv
    x = torch.randn(2, 5, qkv.base_layer.in_features)
    expected = qkv.base_layer(x) * qkv.ssf_scale + qkv.ssf_shift
    torch.testing.assert_close(qkv(x), expected, atol=1e-6, rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert qkv(x).dtype == torch.bfloat16


# ---------------------------------------------------------------------- benchmark machinery
def test_interleaving_rotates_cases_and_ratios_pair_rounds() -> None:
    calls: list[str] = []
    times = interleaved({c: (lambda c=c: calls.append(c)) for c in "abc"}, rounds=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(t.wall) == 3 and len(t.cpu) == 3 for t in times.values())
    case, ref = Timings([2.0, 9.0, 12.0], [3.0, 1.5, 1.8]), Timings([1.0, 3.0, 4.0], [1.0, 0.6, 0.5])
    assert paired_ratio(case, ref) == 3.0  # median of the same-round ratios 2, 3, 3
    assert ratio(case, ref) == {"wall": 2.0, "cpu": 3.0}  # fastest over fastest: 2 / 1 and 1.5 / 0.5
    assert seconds({"case": case}) == {"case": {"wall": 2.0, "cpu": 1.5}}
    count = [0]

    def slow_twice_in_three() -> None:  # repeats 1 and 2 of every round sleep, repeat 3 does not
        count[0] += 1
        if count[0] % 3:
            time.sleep(0.05)

    kept = interleaved({"a": slow_twice_in_three}, rounds=2, repeats=3, warmup=0)
    assert count[0] == 6 and len(kept["a"].wall) == 2
    assert all(t < 0.05 for t in kept["a"].wall), "a round keeps its fastest repeat (the median would sleep)"


def test_round_budget_keeps_min_rounds_then_stops_before_a_round_that_would_end_late() -> None:
    def rounds_run(max_seconds: float | None, min_rounds: int, durations: list[float]) -> int:
        """How many rounds of these durations (on a fake clock) the budget lets run."""
        now = [0.0]
        budget = RoundBudget(max_seconds, min_rounds, clock=lambda: now[0])
        for done, length in enumerate(durations):
            if not budget.allows_round(done):
                return done
            now[0] += length
        return len(durations)

    # rounds 0 and 1 are the minimum (ending at 10 s and 70 s); a third, taken as long as the last
    # (60 s), would end at 130 s > 100 s: not started, although it would have taken 20 s
    assert rounds_run(100.0, 2, [10.0, 60.0, 20.0, 20.0, 20.0, 20.0]) == 2
    assert rounds_run(100.0, 1, [30.0] * 10) == 3  # a 4th round would end at 120 s
    assert rounds_run(None, 1, [30.0] * 20) == 20  # no limit: far past any budget
    with pytest.raises(ValueError, match="min_rounds must be at least 1"):
        RoundBudget(10.0, 0)


def test_interleaved_gives_every_case_the_same_rounds_under_a_budget() -> None:
    calls: list[str] = []
    cases = {c: (lambda c=c: calls.append(c)) for c in "ab"}
    times = interleaved(cases, rounds=5, warmup=1, max_seconds=0.0, min_rounds=3)  # spent at once: the minimum
    assert calls == list("ab") + list("ab") + list("ba") + list("ab")
    assert [len(t.wall) for t in times.values()] == [3, 3]
    times = interleaved(cases, rounds=5, warmup=0, max_seconds=None, min_rounds=3)
    assert [len(t.wall) for t in times.values()] == [5, 5]
    times = interleaved(cases, rounds=2, warmup=0, max_seconds=0.0, min_rounds=4)  # never more than rounds
    assert [len(t.wall) for t in times.values()] == [2, 2]
    first = [True]

    def slow_warmup() -> None:  # only its first call, the warm-up, takes time
        if first[0]:
            first[0] = False
            time.sleep(0.05)

    # The warm-up counts: it used the 0.04 s budget, so only the minimum round runs (were the clock
    # started after it, 5 instant rounds would fit).
    times = interleaved({"a": slow_warmup}, rounds=5, warmup=1, max_seconds=0.04, min_rounds=1)
    assert len(times["a"].wall) == 1
    assert len(interleaved({"a": lambda: None}, rounds=5, warmup=1, max_seconds=30.0, min_rounds=1)["a"].wall) == 5


def test_quick_step_rounds_have_a_time_budget_and_the_full_run_none(monkeypatch) -> None:
    import benchmarks.__main__ as bench
    import benchmarks.steps as steps

    calls = []

    def fake_step_ratios(backbone, names, rounds, max_seconds=None, min_rounds=1):
        calls.append((backbone, names, rounds, max_seconds, min_rounds))
        return {"lora": {"wall": 0.7, "cpu": 0.7}}, {"adapter_bytes": {"lora": 1}, "rounds": rounds}

    monkeypatch.setattr(steps, "step_ratios", fake_step_ratios)
    monkeypatch.setattr(steps, "channels_last_ratio", lambda *a, **k: ({"wall": 1.0, "cpu": 1.0}, {}))
    bench._steps({"quick": True})
    assert calls == [("vit_small_patch16_224", steps.QUICK, bench.QUICK_MAX_ROUNDS, bench.QUICK_STEP_SECONDS, 4)]
    calls.clear()
    bench._steps({"quick": False})
    assert [c[2:] for c in calls] == [(8, None, 1), (4, None, 1)]  # ViT-S and ResNet-50: every round


def test_quick_inference_rounds_have_a_time_budget_and_the_full_run_none(monkeypatch) -> None:
    import benchmarks.__main__ as bench
    import benchmarks.inference as inference

    calls = []

    def fake_infer_ratios(names, rounds, repeats=2, unmerged_names=None, max_seconds=None, min_rounds=1):
        calls.append((rounds, repeats, max_seconds, min_rounds))
        return {}, {}, {"control": {"wall": 1.0, "cpu": 1.0}}

    monkeypatch.setattr(inference, "infer_ratios", fake_infer_ratios)
    bench._inference({"quick": True})
    bench._inference({"quick": False})
    assert calls == [(bench.QUICK_MAX_ROUNDS, 4, bench.QUICK_INFER_SECONDS, 6), (6, 5, None, 1)]


def test_lightning_overhead_stops_the_fit_when_its_step_budget_is_spent(monkeypatch) -> None:
    """The interleaving callback asks the Trainer to stop once the minimum steps are done and the
    budget is spent, never before; without a budget it never does. ``--quick`` passes a budget."""
    from types import SimpleNamespace

    import benchmarks.__main__ as bench
    from benchmarks import lightning_loop

    plain = SimpleNamespace(step=lambda b: None)
    batches = lightning_loop.Batches([{}] * 5)
    for max_seconds, stops_after in ((0.0, 3), (None, None)):
        clock = lightning_loop._Interleave(plain, batches, max_seconds=max_seconds, min_steps=3)
        trainer = SimpleNamespace(should_stop=False)
        clock.on_train_start(trainer, None)
        stopped = None
        for i in range(5):
            clock.on_train_batch_start(trainer, None, {}, i)
            clock.on_train_batch_end(trainer, None, None, {}, i)
            if trainer.should_stop and stopped is None:
                stopped = i + 1
        assert stopped == stops_after
    calls = []
    monkeypatch.setattr(lightning_loop, "lightning_overhead", lambda config, **kw: calls.append(kw) or (1.0, {}))
    bench._lightning({"quick": True}), bench._lightning({"quick": False})
    assert calls == [{"steps": 24, "max_seconds": bench.QUICK_LIGHTNING_SECONDS, "min_steps": 6}, {"steps": 16}]


def test_adjacent_ratios_alternate_the_order_with_one_repeat() -> None:
    calls: list[str] = []
    ref_rounds = Timings()
    adjacent_ratios({"x": lambda: calls.append("x")}, lambda: calls.append("ref"), rounds=4, repeats=1, warmup=0,
                    ref_rounds=ref_rounds)
    pairs = [tuple(calls[i:i + 2]) for i in range(0, len(calls), 2)]
    assert pairs == [("ref", "x"), ("x", "ref"), ("ref", "x"), ("x", "ref")]
    assert len(ref_rounds.wall) == len(ref_rounds.cpu) == 4  # the reference's fastest run of each round
    calls.clear()
    ref_rounds = Timings()
    adjacent_ratios({"x": lambda: None, "y": lambda: None}, lambda: None, rounds=3, repeats=2, warmup=0,
                    ref_rounds=ref_rounds)
    assert len(ref_rounds.wall) == 6  # one per case and round, not one per repeat
    calls.clear()
    ref_rounds = Timings()
    adjacent_ratios({"x": lambda: calls.append("x")}, lambda: calls.append("ref"), rounds=5, repeats=1, warmup=1,
                    ref_rounds=ref_rounds, max_seconds=0.0, min_rounds=2)  # the budget spent at once
    assert len(ref_rounds.wall) == 2 and calls.count("x") == 1 + 2  # the warm-up and the minimum rounds


def test_targets_name_existing_configs_and_evaluate_pass_fail(tmp_path: Path) -> None:
    configs = set(peft_configs())
    assert set(NO_WEIGHT_GRAD) | {"full", "linear_probe"} <= configs
    rows = evaluate({"step_ratio.lora": 0.7, "step_ratio.ssf": 0.9, "merged_infer_ratio.bitfit": 1.01,
                     "t2i_cached_latents_ratio": "unavailable: no precompute", "adapter_bytes.lora": 10})
    by_key = {r["key"]: r for r in rows}
    assert by_key["step_ratio.lora"]["pass"] and by_key["merged_infer_ratio.bitfit"]["pass"]
    assert by_key["step_ratio.ssf"]["pass"] is False and by_key["step_ratio.ssf"]["note"]
    assert by_key["t2i_cached_latents_ratio"]["pass"] is None and "adapter_bytes.lora" not in by_key
    assert len({t.pattern for t in TARGETS}) == len(TARGETS)
    json.dumps(rows)
    lines = config_table({"step_ratio.lora": 0.7, "peak_mem_ratio.lora": 0.6, "step_ratio.ssf": 0.9,
                          "adapter_bytes.lora": 602463, "adapter_bytes.full": 86681657, "lightning_overhead": 1.0}).splitlines()
    assert lines[0] == "| config | step / full (ViT-S) | peak memory / full | adapter |"
    assert lines[2:] == ["| lora | 0.7 | 0.6 | 602.5 KB |", "| ssf | 0.9 |  |  |", "| full |  |  | 86.7 MB |"]


# ---------------------------------------------------------------------- fused low-rank layers (FacT, LoRA on q / v)
def _fast_and_slow(peft_factory, kind: type) -> tuple[ImageClassifier, ImageClassifier]:
    """Two equal modules with non-zero adapters; the second always takes the module-by-module path."""
    fast, slow = module(peft_factory()), module(peft_factory())
    with torch.no_grad():
        for p in fast.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    slow.load_state_dict(fast.state_dict())
    assert list(slow.state_dict()) == list(fast.state_dict())
    layers = [m for m in slow.modules() if isinstance(m, kind)]
    assert layers
    for m in layers:
        m.fast_path = False
    return fast, slow


def _assert_same_step(fast: ImageClassifier, slow: ImageClassifier, x: torch.Tensor) -> None:
    """Same training-mode logits and gradients (same dropout masks), and the same eval logits."""
    results = []
    for m in (fast, slow):
        torch.manual_seed(7)
        logits = m.train()(x)
        torch.manual_seed(7)
        results.append((logits.detach(), loss_and_grads(m, x)))
    (lf, (_, gf)), (ls, (_, gs)) = results
    torch.testing.assert_close(lf, ls, atol=1e-5, rtol=1e-5)
    assert gf.keys() == gs.keys() and gf
    for name in gf:
        torch.testing.assert_close(gf[name], gs[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), slow.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["tt", "tk"])
def test_fused_fact_layer_gives_the_module_paths_logits_and_gradients(kind: str, monkeypatch) -> None:
    import peft_methods.fact as fact_module
    from peft_methods import FacT
    from peft_methods.fact import FacTLinear

    calls = []
    fused = fact_module.low_rank_linear
    monkeypatch.setattr(fact_module, "low_rank_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    fast, slow = _fast_and_slow(lambda: FacT(kind, dropout=0.1), FacTLinear)
    _assert_same_step(fast, slow, images())
    assert calls  # the fast path ran (and the slow one did not call it)
    FacT(kind).merge(fast.model), FacT(kind).merge(slow.model)
    torch.testing.assert_close(fast.eval()(images()), slow.eval()(images()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [None, ["q", "k", "v"]])
def test_fused_qkv_lora_gives_the_module_paths_logits_and_gradients(targets, monkeypatch) -> None:
    import peft_methods.qkv_split as qkv_module
    from peft_methods.qkv_split import QKVSplit

    calls = []
    fused = qkv_module.low_rank_linear
    monkeypatch.setattr(qkv_module, "low_rank_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    fast, slow = _fast_and_slow(lambda: LoRA(targets=targets), QKVSplit)
    assert any(".attn.qkv.q.lora_A.default.weight" in n for n in fast.state_dict())
    _assert_same_step(fast, slow, images())
    assert calls
    # Any other peft state takes the module path: disabled adapters, merged weights.
    x = images()
    fast.eval(), slow.eval()
    with torch.no_grad():
        expected = slow(x)
        n = len(calls)
        for m in (fast, slow):
            for layer in [layer for layer in m.modules() if hasattr(layer, "lora_A")]:
                layer.enable_adapters(False)
        torch.testing.assert_close(fast(x), slow(x), atol=1e-5, rtol=1e-5)
        assert len(calls) == n
        layers = [layer for layer in fast.modules() if hasattr(layer, "lora_A")]
        for layer in layers:
            layer.enable_adapters(True)
            layer.merge()
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)
        assert len(calls) == n
        for layer in layers:
            layer.unmerge()
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)
        assert len(calls) > n


def _bf16_step(m: ImageClassifier, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode logits (fp32) and every trainable gradient (flattened), under bf16 autocast or not."""
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = m.train()(x)
    assert logits.dtype == (torch.bfloat16 if autocast else torch.float32)
    logits.float().logsumexp(-1).mean().backward()
    grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad])
    m.zero_grad()
    return logits.detach().float(), grads


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk", "lora"])
def test_fused_low_rank_under_bf16_autocast_is_as_accurate_as_the_module_path(method: str, monkeypatch) -> None:
    """Under bf16 autocast the fused layers run in bf16 (as autocast's Linear layers do): their logits
    and gradients are as far from the fp32 result as the module path's, not bitwise equal to it."""
    import peft_methods.fact as fact_module
    import peft_methods.qkv_split as qkv_module
    from peft_methods import FacT
    from peft_methods.fact import FacTLinear
    from peft_methods.qkv_split import QKVSplit

    calls = []
    for mod in (fact_module, qkv_module):
        fused = mod.low_rank_linear
        monkeypatch.setattr(mod, "low_rank_linear", lambda *a, _f=fused, **k: calls.append(1) or _f(*a, **k))
    factory, kind = {
        "fact_tt": (lambda: FacT("tt", dropout=0.1), FacTLinear),
        "fact_tk": (lambda: FacT("tk", dropout=0.1), FacTLinear),
        "lora": (LoRA, QKVSplit),
    }[method]
    fast, slow = _fast_and_slow(factory, kind)
    x = images()
    ref_logits, ref_grads = _bf16_step(slow, x, autocast=False)
    fused_logits, fused_grads = _bf16_step(fast, x, autocast=True)
    assert len(calls) == 12 * (4 if kind is FacTLinear else 1)  # every adapted layer took the fused path
    module_logits, module_grads = _bf16_step(slow, x, autocast=True)
    assert len(calls) == 12 * (4 if kind is FacTLinear else 1)

    def error(t: torch.Tensor, ref: torch.Tensor) -> float:
        return ((t - ref).norm() / ref.norm()).item()

    for fused_t, module_t, ref in ((fused_logits, module_logits, ref_logits), (fused_grads, module_grads, ref_grads)):
        assert 1e-4 < error(module_t, ref) < 0.03  # bf16 rounding, measured about 0.007-0.012
        assert error(fused_t, ref) < 1.25 * error(module_t, ref)


# ---------------------------------------------------------------------- SSF folded into its layer
def test_folded_ssf_gives_the_direct_paths_outputs_and_gradients() -> None:
    """After Linear / LayerNorm the scale and shift ride on the weights: same function, same gradients."""
    from peft_methods.ssf import ScaleShift

    torch.manual_seed(0)
    folded = module(SSF())
    with torch.no_grad():  # a trained-looking SSF, scales away from 1 (one of them small but safe)
        for name, p in folded.named_parameters():
            if "ssf_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    direct = module(SSF())
    direct.load_state_dict(folded.state_dict())
    wrappers = [m for m in direct.modules() if isinstance(m, ScaleShift)]
    assert sum(m.fold for m in wrappers) == len(wrappers) - 1, "every ViT target but the patch embedding folds"
    for m in wrappers:
        m.fold = False
    x = images(4)
    loss_f, grads_f = loss_and_grads(folded, x)
    loss_d, grads_d = loss_and_grads(direct, x)
    torch.testing.assert_close(loss_f, loss_d, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_d.keys() and any("ssf_scale" in k for k in grads_f)
    for key, grad in grads_d.items():
        torch.testing.assert_close(grads_f[key], grad, rtol=1e-4, atol=1e-5, msg=key)
    folded.eval()
    direct.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), direct(x), rtol=1e-5, atol=1e-5)


def test_folded_ssf_takes_the_direct_path_for_a_near_zero_scale() -> None:
    from peft_methods.ssf import ScaleShift

    layer = ScaleShift(torch.nn.Linear(8, 4), 4, -1)
    layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        layer.ssf_scale[1] = 0.0  # the folded backward would divide by it
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).square().sum().backward()
    expected = (layer.base_layer(x.detach()) * 2 * (layer.ssf_scale.detach() * layer.base_layer(x.detach()) + layer.ssf_shift.detach())).sum(0)
    torch.testing.assert_close(layer.ssf_scale.grad, expected)
    assert torch.isfinite(x.grad).all()


def test_t2i_benchmark_counts_encoder_time_inside_each_step() -> None:
    from benchmarks.t2i import _StepClock

    class Module:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def encode_images(self, images):
            self.calls.append("images")
            return sum(range(20000)), images

        def encode_text(self, captions):
            self.calls.append("text")
            return captions

    clock, m = _StepClock(), Module()
    clock.time_encoders(m)
    for step in range(3):
        clock.on_train_batch_start()
        if step != 1:  # a precomputed step calls no encoder
            assert m.encode_images("x")[1] == "x" and m.encode_text(["c"]) == ["c"]
        clock.on_train_batch_end()
    assert m.calls == ["images", "text"] * 2
    assert len(clock.steps.wall) == len(clock.encoders.cpu) == 3
    assert clock.encoders.wall[1] == 0.0 and clock.encoders.wall[0] > 0 and clock.encoders.wall[2] > 0
    assert all(e <= s for e, s in zip(clock.encoders.wall, clock.steps.wall, strict=True))


def test_t2i_encoder_flop_share_counts_the_parts_and_leaves_the_unet_trainable() -> None:
    """SD v1.5 at 512 px, one image: VAE encoder 1.12 TFLOPs, text encoder 0.01, UNet forward +
    input-gradient backward 1.73, so a share of 0.396; it does not depend on the batch, and the
    UNet's trainable flags are restored."""
    from benchmarks.t2i import encoder_flop_share, sd15_on_meta
    from lightning_modules.t2i_components import build_tiny_components

    assert 0.39 < encoder_flop_share(*sd15_on_meta(), 512, 1) < 0.40
    comps = build_tiny_components(32)
    trainable = {n for n, p in comps.unet.named_parameters() if "attn" in n}
    for n, p in comps.unet.named_parameters():
        p.requires_grad_(n in trainable)
    one, two = (encoder_flop_share(comps.unet, comps.vae, comps.text_encoder, 32, b) for b in (1, 2))
    assert 0.1 < one < 0.5 and abs(one - two) < 1e-9
    assert {n for n, p in comps.unet.named_parameters() if p.requires_grad} == trainable
    assert all(p.grad is None for p in comps.unet.parameters())


def test_t2i_benchmark_alternates_precomputed_and_encoding_steps(monkeypatch) -> None:
    """The demo setting, 2 fits of 6 steps (2 untimed): one module, refitted; its steps alternate
    between the cache and encoding (precomputed ones call no encoder), the first kind by fit."""
    import benchmarks.t2i as t2i

    monkeypatch.setitem(t2i.SETTINGS, "demo", (True, 32, 4))
    built, kinds = [], []
    init, run = t2i._Fits.__init__, t2i._Fits.run

    def checked_run(self, *args, **kwargs):
        clock, encoded = run(self, *args, **kwargs)
        kinds.append(list(encoded))
        # every encoding step spent time in the encoders, no precomputed one did; the cache is back
        assert [e > 0 for e in clock.encoders.cpu] == encoded and self.module.latent_cache is not None
        return clock, encoded

    monkeypatch.setattr(t2i._Fits, "__init__", lambda self, *a: (built.append(a), init(self, *a))[1])
    monkeypatch.setattr(t2i._Fits, "run", checked_run)
    value, details = t2i.t2i_cached_latents_ratio(rounds=2, steps=6, warmup=2, setting="demo")
    assert built == [("demo",)]
    assert kinds == [[False, True] * 3, [True, False] * 3]
    assert details["steps_timed"] == {"precomputed": 4, "encoding_every_step": 4} and details["tiny"] is True
    assert details["encoder_seconds_in_a_precomputed_step"] == 0.0
    assert 0 < details["encoder_share_of_encoding_step"]["cpu"] < 1 and 0 < details["encoder_share_of_flops"] < 1
    assert 0 < details["median_adjacent_step_ratio"]["cpu"] < 2
    sec = details["seconds_per_step"]
    assert value["cpu"] == pytest.approx(sec["precomputed"]["cpu"] / sec["encoding_every_step"]["cpu"], abs=0.01)


def test_benchmark_merged_twin_equals_the_trained_unmerged_model(monkeypatch) -> None:
    """Also for SVDiff, whose parametrized layers a deep copy would break."""
    import benchmarks.inference as inference
    from benchmarks import harness

    monkeypatch.setattr(harness, "IMAGE_SIZE", 32)
    monkeypatch.setattr(inference, "VIT", "vit_tiny_patch16_224")
    x = torch.randn(2, 3, 32, 32)
    for name in ("svdiff", "lora"):
        module = harness.classifier("vit_tiny_patch16_224", harness.method(name))
        adapted = inference._trained(module).eval()
        merged = inference.merged_twin(name).eval()
        plain = harness.classifier("vit_tiny_patch16_224", harness.method("full")).model
        assert [n for n, _ in merged.named_parameters()] == [n for n, _ in plain.named_parameters()], name
        assert [n for n, _ in adapted.named_parameters()] != [n for n, _ in plain.named_parameters()], name
        with torch.no_grad():
            torch.testing.assert_close(merged(x), adapted(x), atol=1e-4, rtol=1e-4)


def test_ssf_grad_reduction_matches_the_two_separate_sums() -> None:
    """The fused CPU reduction (BatchNorm's backward) and the generic one give the gamma / beta gradients
    of float64 sums to fp32 accuracy, also for a non-contiguous (expanded) bf16 gradient."""
    from peft_methods.ssf import _scale_shift_grads

    g = torch.Generator().manual_seed(0)
    grad_y, y = torch.randn(4, 50, 96, generator=g), torch.randn(4, 50, 96, generator=g)
    signs = torch.where(torch.arange(96) % 2 == 0, 1.0, -1.0)
    gamma, beta = (torch.rand(96, generator=g) + 0.05) * signs, torch.randn(96, generator=g)

    def exact(dy: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dy, out = dy.double(), out.double()
        return (dy * (out - beta.double())).sum((0, 1)) / gamma.double(), dy.sum((0, 1))

    expanded = grad_y[:1, :1].bfloat16().expand(4, 50, 96)  # stride 0, as from y.sum().backward()
    cases = ((grad_y, y), (grad_y.double(), y.double()), (grad_y.bfloat16(), y.bfloat16()), (expanded, y.bfloat16()))
    for dy, out in cases:
        got = _scale_shift_grads(dy, out, gamma, beta)  # fp32 / bf16: fused; float64: two sums
        assert all(t.dtype == torch.float32 for t in got)
        for have, want in zip(got, exact(dy, out), strict=True):
            torch.testing.assert_close(have.double(), want, rtol=1e-5, atol=1e-4)


def test_a_failing_benchmark_family_keeps_the_others_results(tmp_path: Path, monkeypatch, capsys) -> None:
    """One family raising: the others still run and land in the JSON, the failure is named, exit non-zero."""
    import benchmarks.__main__ as bench

    def broken(_ctx: dict) -> tuple[dict, dict]:
        raise RuntimeError("boom")

    monkeypatch.setitem(bench.FAMILIES, "broken", broken)
    monkeypatch.setitem(bench.FAMILIES, "fine", lambda _ctx: ({"cached_epoch_ratio": {"wall": 0.1, "cpu": 0.12}}, {}))
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()  # main() sets process-wide state: restored for the other tests
    loggers = {n: logging.getLogger(n).level for n in ("lightning", "lightning.pytorch", "lightning.fabric", "medpeft")}
    try:
        with pytest.raises(SystemExit, match=r"benchmark families failed: broken \(RuntimeError: boom\)"):
            bench.main(["--only", "broken", "fine", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)
    saved = json.loads(out.read_text())
    assert saved["cached_epoch_ratio"] == 0.12 and saved["other_clock"]["cached_epoch_ratio"] == 0.1
    assert saved["failed_families"] == {"broken": "RuntimeError: boom"} and "failed_families" not in saved["details"]
    assert saved["complete"] is False and saved["families_done"] == ["broken", "fine"]
    assert [r["pass"] for r in saved["targets"]] == [True]
    assert "broken failed: RuntimeError: boom" in capsys.readouterr().out
    from benchmarks.report import main as report_main

    report_main([str(out)])
    printed = capsys.readouterr().out
    assert "| cached_epoch_ratio | 0.12 | 0.1 | <= 0.2 | PASS |" in printed and "| complete |" not in printed
    assert printed.rstrip().endswith("incomplete run: families done ['broken', 'fine'], failed ['broken'].")


def test_machine_record_tells_apart_hosts_whose_model_name_is_the_vendors_alone() -> None:
    """Two VMs both named "AMD EPYC": the record keeps the first processor's family / model and the summary names them."""
    from benchmarks.__main__ import cpu_id
    from benchmarks.harness import cpu_identity

    zen4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
    zen5 = zen4.replace(": 25", ": 26").replace(": 17", ": 2")
    assert cpu_identity(zen4 + "\n" + zen5) == {"cpu": "AMD EPYC", "cpu_family": "25", "cpu_model": "17"}
    assert cpu_identity(zen5) == {"cpu": "AMD EPYC", "cpu_family": "26", "cpu_model": "2"}
    assert cpu_identity("processor\t: 0\nmodel name\t: Apple M2\n") == {"cpu": "Apple M2", "cpu_family": None, "cpu_model": None}
    assert cpu_id({"cpu_family": "25", "cpu_model": "17", "isa": "AVX512", "native_bf16": True}) == ", family 25 model 17, AVX512 + native bf16"
    assert cpu_id({"cpu_family": None, "cpu_model": None, "isa": "AVX2", "native_bf16": False}) == ", AVX2"
    amx = {"cpu_family": "6", "cpu_model": "167", "isa": "AVX512", "amx": True, "native_bf16": True}
    assert cpu_id(amx) == ", family 6 model 167, AVX512 + AMX + native bf16"


def test_inference_benchmark_reports_unmerged_latency_only_where_measured(monkeypatch) -> None:
    """Quick mode measures unmerged latency for LoRA only: SSF gets no unmerged value (not its merged one);
    a selective method (BitFit) is plain either way and gets its one measurement for both."""
    import benchmarks.inference as inference

    measured: list[str] = []

    def fake_adjacent(cases: dict, ref, rounds: int, repeats: int, ref_rounds: Timings, max_seconds, min_rounds) -> dict:
        measured.extend(cases)
        times = [0.5] * (2 * len(cases) - 1) + [0.25]  # two rounds of every case
        ref_rounds.wall.extend(times)
        ref_rounds.cpu.extend(times)
        return {name: {"wall": 1.0 + i / 100, "cpu": 1.0 + i / 100} for i, name in enumerate(cases)}

    monkeypatch.setattr(inference, "adjacent_ratios", fake_adjacent)
    merged, unmerged, details = inference.infer_ratios(("lora", "ssf", "bitfit"), rounds=1, unmerged_names=("lora",))
    assert measured == ["control.plain_twin", "unmerged.lora", "merged.lora", "merged.ssf", "merged.bitfit"]
    assert set(merged) == {"lora", "ssf", "bitfit"} and set(unmerged) == {"lora", "bitfit"}
    assert details["control"] == {"wall": 1.0, "cpu": 1.0}
    assert details["plain_seconds_per_pass"] == {"wall": 0.25, "cpu": 0.25}  # the fastest reference pass
    assert details["rounds"] == 2
    assert unmerged["bitfit"] == merged["bitfit"] and unmerged["lora"] != merged["lora"]


#: Calls keep_freed_memory; checks where a 16 MiB block comes from (mallinfo2: heap, or a block of its
#: own mmap) and whether freeing it keeps the memory; then allocates (posix_memalign, as torch's CPU
#: tensors), writes and frees 48 blocks of 1-8 MiB five times (the pattern of a training step's
#: activations), counting the minor page faults of the last two rounds.
_ALLOCATION_ROUNDS = """
import ctypes, importlib.util, json, resource
# the module file alone: the package would import torch, timm and lightning
spec = importlib.util.spec_from_file_location("allocator", "lightning_modules/allocator.py")
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
said = allocator.keep_freed_memory()

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.posix_memalign.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t)
libc.free.argtypes = (ctypes.c_void_p,)

def alloc(size):
    ptr = ctypes.c_void_p()
    assert libc.posix_memalign(ctypes.byref(ptr), 64, size) == 0
    ctypes.memset(ptr, 1, size)
    return ptr

mmapped_before = libc.mallinfo2().hblks
block = alloc(16 * 2**20)
mmapped = libc.mallinfo2().hblks - mmapped_before
libc.free(block)
free_after = libc.mallinfo2().fordblks
sizes = [(i % 8 + 1) * 2**20 for i in range(48)]
for round_ in range(5):
    if round_ == 3:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [alloc(n) for n in sizes]
    for ptr in blocks:
        libc.free(ptr)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps(dict(said=said, mmapped=mmapped, free_after=free_after, faults=faults)))
"""

_GLIBC = runs_glibc()
#: The environment through which a user chooses the allocator: cleared so that each test sets its own.
_ALLOCATOR_CHOICE = ("LD_PRELOAD", "GLIBC_TUNABLES", "MEDPEFT_CPU_ALLOCATOR")


@pytest.mark.skipif(not _GLIBC, reason="glibc only")
def test_kept_freed_memory_is_reused_without_page_faults() -> None:
    """Kept, blocks come from the heap and freed ones are reused; returned to the kernel, every page faults again.

    glibc's own default lies in between and varies from process to process (whether a small block
    pins the top of the heap): 1k-110k faults for this pattern, up to 110k per ViT-S training step.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in _ALLOCATOR_CHOICE}

    def run(**extra: str) -> dict:
        done = subprocess.run([sys.executable, "-c", _ALLOCATION_ROUNDS], cwd=Path(__file__).resolve().parents[1],
                              env={**env, **extra}, capture_output=True, text=True, timeout=120, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    pages = 2 * sum((i % 8 + 1) * 2**20 for i in range(48)) // os.sysconf("SC_PAGE_SIZE")  # two measured rounds
    kept = run()
    assert kept["said"].startswith("glibc malloc keeps")
    assert kept["mmapped"] == 0 and kept["free_after"] >= 16 * 2**20  # from the heap, and kept once freed
    assert kept["faults"] < pages // 100
    # The user's choice (every block over 128 KiB its own mmap) is left alone, and it faults every page.
    returned = run(MALLOC_MMAP_THRESHOLD_="131072")
    assert returned["said"] == "unchanged: glibc malloc options set in the environment"
    assert returned["mmapped"] >= 1 and returned["faults"] > max(20 * kept["faults"], pages // 2)


@pytest.mark.skipif(not _GLIBC, reason="glibc only")
def test_allocator_settings_and_when_they_are_left_alone(monkeypatch) -> None:
    from lightning_modules import allocator

    if "LD_PRELOAD" not in os.environ:
        assert allocator._interposed_malloc() is False  # this process runs glibc's own malloc
    for name in [k for k in os.environ if k.startswith("MALLOC_")] + list(_ALLOCATOR_CHOICE):
        monkeypatch.delenv(name, raising=False)
    calls: list[tuple[int, int]] = []
    refuse: set[int] = set()

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 0 if param in refuse else 1

    monkeypatch.setattr(allocator, "_glibc_mallopt", lambda: mallopt)
    monkeypatch.setattr(allocator, "_interposed_malloc", lambda: False)
    assert keep_freed_memory().startswith("glibc malloc keeps")
    # M_MMAP_THRESHOLD (-3) 32 MiB, M_TRIM_THRESHOLD (-1) 2 GiB - 1, M_TOP_PAD (-2) 64 MiB
    assert calls == [(-3, 32 * 2**20), (-1, 2**31 - 1), (-2, 64 * 2**20)]
    calls.clear()
    refuse.add(-3)
    assert keep_freed_memory() == "partly set: glibc refused mallopt parameters [-3]"
    assert len(calls) == 3, "a refused value does not stop the others"
    calls.clear()
    for name, value, reason in (
        ("MEDPEFT_CPU_ALLOCATOR", "default", "unchanged: MEDPEFT_CPU_ALLOCATOR=default"),
        ("MALLOC_ARENA_MAX", "2", "unchanged: glibc malloc options set in the environment"),
        ("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1", "unchanged: glibc malloc options set in the environment"),
    ):
        monkeypatch.setenv(name, value)
        assert keep_freed_memory() == reason
        monkeypatch.delenv(name)
    monkeypatch.setattr(allocator, "_interposed_malloc", lambda: True)
    assert keep_freed_memory() == "unchanged: another allocator replaces glibc's malloc"
    assert calls == []
