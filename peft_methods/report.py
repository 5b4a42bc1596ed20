"""Parameter report: trainable / total parameters of every ``configs/peft/*.yaml`` on one backbone.

    python -m peft_methods.report --backbone vit_base_patch16_224 [--num-classes 0] [--json]

The backbone is built without pretrained weights (no network), on the meta device where the method
can be applied there (no memory, fast for ViT-B), otherwise on the CPU.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_methods.base import build_method, count_params

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "peft"
COLUMNS = ("config", "method", "trainable", "total", "% trainable", "mergeable", "supported")


def read_peft_spec(path: Path) -> dict[str, Any]:
    """The ``model.init_args.peft`` mapping of an override-only YAML config."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    spec = (((data.get("model") or {}).get("init_args") or {}).get("peft")) if isinstance(data, dict) else None
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{path} has no model.init_args.peft.class_path; every configs/peft/*.yaml needs one.")
    return spec


def build_backbone(name: str, num_classes: int, device: str) -> nn.Module:
    """A timm backbone without pretrained weights, created directly on ``device``."""
    import timm

    with torch.device(device):
        return timm.create_model(name, pretrained=False, num_classes=num_classes)


def method_row(config: str, spec: dict[str, Any], backbone: str, num_classes: int) -> dict[str, Any]:
    """One report row: counts after ``apply``, or ``supported: False`` with the reason."""
    method = build_method(spec)
    row: dict[str, Any] = {"config": config, "method": type(method).__name__, "mergeable": method.mergeable}
    for device in ("meta", "cpu"):
        model = build_backbone(backbone, num_classes, device)
        reason = method.unsupported_reason(model)
        if reason is None:
            try:
                method.apply(model)
            except Exception as err:  # noqa: BLE001 - a method may not run on meta tensors: retry on CPU
                if device == "meta":
                    continue
                if not isinstance(err, ValueError):
                    raise
                reason = str(err)
        if reason is not None:
            return {**row, "trainable": None, "total": None, "supported": False, "reason": reason}
        trainable, total = count_params(model)
        return {**row, "trainable": trainable, "total": total, "supported": True}
    raise AssertionError("unreachable: the CPU attempt always returns")


def build_report(
    backbone: str, num_classes: int = 0, config_dir: Path = CONFIG_DIR
) -> list[dict[str, Any]]:
    """Rows for every ``*.yaml`` in ``config_dir`` (sorted by name) on ``backbone``."""
    import timm

    if not timm.is_model(backbone):
        close = difflib.get_close_matches(backbone, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models() for all names."
        raise ValueError(f"Unknown backbone '{backbone}' (--backbone): it is not a timm model name.{hint}")
    paths = sorted(config_dir.glob("*.yaml"))
    if not paths:
        raise ValueError(f"No PEFT configs (*.yaml) under {config_dir}.")
    return [method_row(p.stem, read_peft_spec(p), backbone, num_classes) for p in paths]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Aligned text table with thousands separators (numbers right-aligned)."""
    cells = []
    for r in rows:
        ok = r["supported"]
        cells.append((
            r["config"],
            r["method"],
            f"{r['trainable']:,}" if ok else "-",
            f"{r['total']:,}" if ok else "-",
            f"{100 * r['trainable'] / r['total']:.3f}%" if ok and r["total"] else "-",
            "yes" if r["mergeable"] else "no",
            "yes" if ok else f"no: {r['reason']}",
        ))
    widths = [max(len(c[i]) for c in [COLUMNS, *cells]) for i in range(len(COLUMNS) - 1)]
    right = {2, 3, 4}

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values[:-1], widths, strict=True))]
        return "  ".join([*parts, values[-1]]).rstrip()

    rule = "  ".join("-" * w for w in widths) + "  " + "-" * len(COLUMNS[-1])
    return "\n".join([line(COLUMNS), rule, *(line(c) for c in cells)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m peft_methods.report",
        description="Trainable / total parameters of every configs/peft/*.yaml on one timm backbone.",
    )
    parser.add_argument("--backbone", required=True, help="timm model name, e.g. vit_base_patch16_224")
    parser.add_argument("--num-classes", type=int, default=0, help="task head outputs (0 = no head)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--configs", type=Path, default=CONFIG_DIR, help="directory of PEFT YAML configs")
    args = parser.parse_args(argv)
    try:
        rows = build_report(args.backbone, args.num_classes, args.configs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
