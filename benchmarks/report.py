"""Targets, pass/fail, and the printed table."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from benchmarks.steps import NO_WEIGHT_GRAD


@dataclass(frozen=True)
class Target:
    """``pattern`` (fnmatch over result keys) must be <= ``limit``."""

    pattern: str
    limit: float
    why: str


TARGETS: tuple[Target, ...] = (
    *(Target(f"step_ratio.{n}", 0.75, "needs no backbone weight gradient") for n in NO_WEIGHT_GRAD),
    Target("step_ratio.linear_probe", 0.40, "backbone forward only"),
    Target("merged_infer_ratio.*", 1.02, "a merged model is the plain backbone"),
    Target("lightning_overhead", 1.10, "Trainer loop vs plain loop"),
    Target("peft_lib_ratio", 1.05, "our LoRA vs a plain timm + peft script"),
    Target("cached_epoch_ratio", 0.2, "decode-once image cache"),
    Target("linear_probe_cached_ratio", 0.1, "frozen-feature cache"),
    Target("t2i_cached_latents_ratio", 0.7, "precomputed latents and text embeddings"),
    *(Target(f"peak_mem_ratio.{n}", 0.7, "no gradients or optimizer state for the backbone")
      for n in ("lora", "ssf", "bitfit")),
)

#: Why a target can stay out of reach on a CPU, printed beside a failing measurement. Each names the
#: cost that the speed-up cannot remove (see the README's Performance section for the measurements).
LIMITS: dict[str, str] = {
    "step_ratio.lora": "the floor (step_ratio.floor: input gradients through every block) plus the rank-8 "
                       "products of q and v, fused into the frozen q/k/v GEMM",
    "step_ratio.ssf": "the floor (step_ratio.floor) plus, per folded layer, the weight-sized scaling and the "
                      "per-channel reductions of the scale and shift gradients; the patch embedding's SSF "
                      "stays a per-channel pass over its output",
    "step_ratio.fact_tt": "the floor (step_ratio.floor) plus three rank-8 products per adapted layer forward "
                          "and five backward (48 layers), memory-bound at rank 8",
    "step_ratio.vpt_shallow": "10 prompt tokens lengthen every block's sequence (207 vs 197 tokens), so "
                              "forward and input-gradient work grows on top of the floor (step_ratio.floor)",
    "step_ratio.*": "input gradients still flow through every block (attention, norms, GELU): "
                    "step_ratio.floor, a LinearProbe that back-propagates through every block and computes "
                    "nothing else, is the bound no method training inside the blocks can beat",
    "t2i_cached_latents_ratio": "precompute removes exactly the VAE-encoder and text-encoder passes; their "
                                "measured share of an encoding step puts the ratio at about 1 - share, up to "
                                "timing noise (details.t2i_cached_latents_ratio.bound_1_minus_encoder_share): "
                                "the UNet forward + backward remains",
    "peak_mem_ratio.ssf": "the SSF after the patch embedding, attn.proj and mlp.fc2 keeps an activation "
                          "that no later op saves",
    "peak_mem_ratio.*": "activations for the input gradients dominate training memory at batch 8",
    "merged_infer_ratio.*": (
        "a merged model is the plain architecture: a deviation is timing noise (infer_control_ratio, two "
        "identical plain models measured the same way, shows this run's noise)"
    ),
}


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per result key that a target covers: value, limit, pass, and the known limit if failing."""
    rows = []
    for target in TARGETS:
        for key in sorted(k for k in results if fnmatch.fnmatchcase(k, target.pattern)):
            value = results[key]
            if not isinstance(value, int | float):
                rows.append({"key": key, "value": value, "limit": target.limit, "pass": None,
                             "note": str(value)})
                continue
            ok = value <= target.limit
            note = "" if ok else next((why for pat, why in LIMITS.items() if fnmatch.fnmatchcase(key, pat)), "")
            rows.append({"key": key, "value": value, "limit": target.limit, "pass": ok, "note": note})
    return rows


def table(results: dict[str, Any], other_clock: dict[str, Any], clock: str) -> str:
    """A markdown table of every result; targets marked PASS / FAIL."""
    checks = {r["key"]: r for r in evaluate(results)}
    other = "wall" if clock == "cpu" else "cpu"
    lines = [f"| measurement | value ({clock}) | {other} clock | target | status |", "|---|---|---|---|---|"]
    for key, value in results.items():
        check = checks.get(key)
        target = f"<= {check['limit']}" if check else ""
        status = "" if check is None else {True: "PASS", False: "FAIL", None: "n/a"}[check["pass"]]
        if check and check["pass"] is False and check["note"]:
            status += f": {check['note']}"
        alt = other_clock.get(key, "")
        lines.append(f"| {key} | {value} | {alt} | {target} | {status} |")
    return "\n".join(lines)


#: Per-config columns of ``config_table``: (result-key prefix, column title).
CONFIG_COLUMNS: tuple[tuple[str, str], ...] = (
    ("step_ratio", "step / full (ViT-S)"),
    ("step_ratio_resnet50", "step / full (ResNet-50)"),
    ("merged_infer_ratio", "merged inference / plain"),
    ("unmerged_infer_ratio", "unmerged inference / plain"),
    ("peak_mem_ratio", "peak memory / full"),
    ("adapter_bytes", "adapter"),
)


def _size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def config_table(results: dict[str, Any]) -> str:
    """A markdown table with one row per PEFT config and one column per per-config measurement."""
    columns = [(prefix, title) for prefix, title in CONFIG_COLUMNS if any(k.startswith(prefix + ".") for k in results)]
    configs: list[str] = []
    for key in results:
        prefix, _, name = key.partition(".")
        if name and prefix in dict(columns) and name not in configs:
            configs.append(name)
    lines = ["| config | " + " | ".join(title for _, title in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in configs:
        cells = []
        for prefix, _ in columns:
            value = results.get(f"{prefix}.{name}", "")
            cells.append(_size(value) if prefix == "adapter_bytes" and isinstance(value, int) else str(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.report FILE.json``: the tables of a saved run."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    parser.add_argument("json", type=Path, help="a file written by python -m benchmarks --json")
    args = parser.parse_args(argv)
    report = json.loads(args.json.read_text())
    meta = ("machine", "settings", "targets", "other_clock", "details", "complete", "families_done", "failed_families")
    results = {k: v for k, v in report.items() if k not in meta}
    clock = report.get("settings", {}).get("clock", "cpu")
    print(table(results, report.get("other_clock", {}), clock))
    print()
    print(config_table(results))
    if report.get("complete") is False:
        failed = report.get("failed_families") or {}
        print(f"\nincomplete run: families done {report.get('families_done')}"
              + (f", failed {sorted(failed)}" if failed else "") + ".")


if __name__ == "__main__":
    main()
