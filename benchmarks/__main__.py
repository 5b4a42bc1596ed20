"""Every performance ratio of medpeft, measured side by side in one run.

``python -m benchmarks [--quick] [--json FILE] [--threads N] [--clock cpu|wall] [--precision P] [--only FAMILY ...]``
prints a table (targets marked PASS / FAIL, with the reason where a target stays out of reach) and
writes one JSON object: the flat ratios (``step_ratio.<config>``, ``merged_infer_ratio.<config>``,
...), plus ``machine``, ``settings``, ``targets``, ``other_clock`` and ``details``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never wait for the hub


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the targets' configs only, on ViT-S (< 10 min)")
    parser.add_argument("--json", type=Path, default=None, help="write the results object here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: per-work ratios, robust to other jobs on the cores)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="clock of the reported ratios (the other is kept under other_clock)")
    parser.add_argument("--precision", choices=("auto", "bf16-mixed", "32-true"), default="auto",
                        help="training precision of every measurement (auto: what a run on this CPU picks)")
    parser.add_argument("--only", nargs="+", default=None, metavar="FAMILY",
                        help="run only these families: " + ", ".join(FAMILIES))
    return parser.parse_args(argv)


def _flat(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


#: Time budgets of ``--quick``'s step and inference rounds, warm-up included (``harness.RoundBudget``).
QUICK_STEP_SECONDS = 225.0
QUICK_INFER_SECONDS = 100.0
#: ``--quick``'s budget for the Lightning-overhead steps (each a Trainer step and a plain one), which
#: take 40-50 s for the minimum 6 on an AVX2 host in fp32.
QUICK_LIGHTNING_SECONDS = 45.0
#: ``--quick``'s most rounds: reached on a fast host, where they fit the budgets.
QUICK_MAX_ROUNDS = 16


def _steps(ctx: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from benchmarks.harness import RESNET, VIT
    from benchmarks.steps import QUICK, channels_last_ratio, step_ratios

    quick = ctx["quick"]
    # --quick: the targets' configs, all on ViT-S; its time goes to rounds, the ratios' only defence
    # against the host's bursts. ResNet-50 and channels_last (no targets) are in the full run. As
    # many rounds as fit QUICK_STEP_SECONDS, up to QUICK_MAX_ROUNDS: on an AVX2 host in fp32 (9
    # configs and the floor, about 30 s a round, plus a warm-up pass) that is 6; a busier one gets
    # fewer, at least 4, which helps keep the run within 10 min (the other families have fixed
    # work); a host with native bf16 (about 6-8 s a round) runs all 16.
    if quick:
        vit, vit_d = step_ratios(VIT, QUICK, rounds=QUICK_MAX_ROUNDS, max_seconds=QUICK_STEP_SECONDS, min_rounds=4)
    else:
        vit, vit_d = step_ratios(VIT, None, rounds=8)
    adapters = vit_d.pop("adapter_bytes")
    results = {**_flat("step_ratio", vit), **_flat("adapter_bytes", adapters)}
    details = {"step_ratio": vit_d}
    if not quick:
        cnn, details["step_ratio_resnet50"] = step_ratios(RESNET, None, rounds=4)
        nhwc, details["channels_last_ratio_resnet50"] = channels_last_ratio(RESNET, "full", rounds=4)
        results.update({**_flat("step_ratio_resnet50", cnn), "channels_last_ratio_resnet50": nhwc})
    return results, details


def _inference(ctx: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from benchmarks.harness import peft_configs
    from benchmarks.inference import infer_ratios
    from benchmarks.steps import QUICK

    names = QUICK if ctx["quick"] else tuple(peft_configs())
    quick = ctx["quick"]  # quick: unmerged latency of LoRA only (no target; every config in the full run)
    # --quick: at least the 6 rounds that take 90-110 s on an AVX2 host in fp32, more (up to
    # QUICK_MAX_ROUNDS) where they fit QUICK_INFER_SECONDS.
    if quick:
        merged, unmerged, details = infer_ratios(names, rounds=QUICK_MAX_ROUNDS, repeats=4, unmerged_names=("lora",),
                                                 max_seconds=QUICK_INFER_SECONDS, min_rounds=6)
    else:
        merged, unmerged, details = infer_ratios(names, rounds=6, repeats=5)
    control = details.pop("control")  # two identical plain models: what a ratio of exactly 1 measures as
    return ({**_flat("merged_infer_ratio", merged), **_flat("unmerged_infer_ratio", unmerged),
             "infer_control_ratio": control}, {"infer": details})


def _lightning(ctx: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from benchmarks.lightning_loop import lightning_overhead

    if ctx["quick"]:  # at least 6 steps, up to 24 where they fit the budget
        value, details = lightning_overhead("lora", steps=24, max_seconds=QUICK_LIGHTNING_SECONDS, min_steps=6)
    else:
        value, details = lightning_overhead("lora", steps=16)
    return {"lightning_overhead": value}, {"lightning_overhead": details}


def _peft_lib(ctx: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from benchmarks.steps import peft_lib_ratio

    value, details = peft_lib_ratio(rounds=3 if ctx["quick"] else 5, compare_qv=not ctx["quick"])
    return {"peft_lib_ratio": value}, {"peft_lib_ratio": details}


def _data(ctx: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from benchmarks.data import cached_epoch_ratio, linear_probe_cached_ratio, png_folder

    with tempfile.TemporaryDirectory() as tmp:
        root, kind = png_folder(Path(tmp))
        cached, cached_d = cached_epoch_ratio(root, rounds=2)
        probe, probe_d = linear_probe_cached_ratio(root, train_fraction=0.08 if ctx["quick"] else 0.5,
                                                   rounds=1, epochs=2 if ctx["quick"] else 3)
    return ({"cached_epoch_ratio": cached, "linear_probe_cached_ratio": probe},
            {"data": kind, "cached_epoch_ratio": cached_d, "linear_probe_cached_ratio": probe_d})


def _t2i(ctx: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    import inspect

    from lightning_modules.text_to_image import TextToImage

    if "precompute" not in inspect.signature(TextToImage).parameters:
        reason = "unavailable: TextToImage has no precompute option"
        return {"t2i_cached_latents_ratio": reason}, {}
    from benchmarks.t2i import encoder_flop_share, sd15_on_meta, t2i_cached_latents_ratio

    # The target's setting: SD v1.5's architecture at 1/4 width (1.0-1.5 s steps here).
    if ctx["quick"]:
        value, details = t2i_cached_latents_ratio(rounds=2, steps=14, warmup=2)
        return {"t2i_cached_latents_ratio": value}, {"t2i_cached_latents_ratio": details}
    value, details = t2i_cached_latents_ratio(rounds=4, steps=22, warmup=2)
    demo, demo_details = t2i_cached_latents_ratio(rounds=2, steps=22, warmup=2, setting="demo")
    details["sd15_512px_encoder_share_of_flops"] = round(encoder_flop_share(*sd15_on_meta(), 512, 1), 3)
    return ({"t2i_cached_latents_ratio": value, "t2i_cached_latents_ratio_demo": demo},
            {"t2i_cached_latents_ratio": details, "t2i_cached_latents_ratio_demo": demo_details})


def _memory(ctx: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from benchmarks.harness import peft_configs
    from benchmarks.memory import peak_mem_ratios

    names = ("lora", "ssf", "bitfit") if ctx["quick"] else tuple(peft_configs())
    ratios, details = peak_mem_ratios(names, steps=2, threads=ctx["threads"])
    return _flat("peak_mem_ratio", ratios), {"peak_mem_ratio": details}


FAMILIES: dict[str, Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]] = {
    "steps": _steps, "inference": _inference, "lightning": _lightning, "peft_lib": _peft_lib,
    "data": _data, "t2i": _t2i, "memory": _memory,
}


def _split_clock(results: dict[str, Any], clock: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time ratios come as {"wall", "cpu"}: the chosen clock goes to the results, the other aside."""
    main, other = {}, {}
    for key, value in results.items():
        if isinstance(value, dict) and set(value) == {"wall", "cpu"}:
            main[key] = value[clock]
            other[key] = value["wall" if clock == "cpu" else "cpu"]
        else:
            main[key] = value
    return main, other


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    import lightning  # noqa: F401 - sets its loggers' levels on import; quieted below
    import torch

    from benchmarks.harness import BATCH, IMAGE_SIZE, PRECISION_ENV, machine, precision
    from benchmarks.inference import INFER_BATCH
    from benchmarks.report import config_table, evaluate, table
    from lightning_modules.allocator import keep_freed_memory

    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory()  # as run.py does
    if args.precision != "auto":
        os.environ[PRECISION_ENV] = args.precision  # inherited by the memory subprocesses
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("medpeft").setLevel(logging.WARNING)
    ctx = {"quick": args.quick, "threads": args.threads}
    families = args.only or list(FAMILIES)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown benchmark families {unknown}; choose from {', '.join(FAMILIES)}.")
    started = time.perf_counter()
    results: dict[str, Any] = {}
    other: dict[str, Any] = {}
    details: dict[str, Any] = {"family_seconds": {}}

    done: list[str] = []
    failed: dict[str, str] = {}  # family -> "ErrorType: message"

    def report() -> dict[str, Any]:
        return {
            **results,
            # An interrupted or partly failed run says so: its targets cover only the families that ran.
            "complete": len(done) == len(families) and not failed,
            "families_done": list(done),
            "failed_families": dict(failed),
            "machine": machine(),
            "settings": {"quick": args.quick, "clock": args.clock, "threads": args.threads, "families": families,
                         "batch": BATCH, "infer_batch": INFER_BATCH, "image_size": IMAGE_SIZE, "precision": precision(),
                         "cpu_allocator": allocator,
                         "total_seconds": round(time.perf_counter() - started, 1)},
            "targets": evaluate(results),
            "other_clock": other,
            "details": details,
        }

    for name in families:
        t0 = time.perf_counter()
        print(f"[benchmarks] {name} ...", flush=True)
        try:
            values, info = FAMILIES[name](ctx)
        except Exception as err:  # noqa: BLE001 - one broken family must not lose the others' hour of work
            message = f"{type(err).__name__}: {err}"
            traceback.print_exc()
            print(f"[benchmarks] {name} failed: {message}", flush=True)
            failed[name] = message
            values, info = {}, {}
        main_values, other_values = _split_clock(values, args.clock)
        results.update(main_values)
        other.update(other_values)
        details.update(info)
        details["family_seconds"][name] = round(time.perf_counter() - t0, 1)
        done.append(name)
        if args.json is not None:  # after every family: an interrupted run keeps what it measured
            _write(args.json, report())
    final = report()
    print()
    print(table(results, other, args.clock))
    print()
    print(config_table(results))
    checks = [r for r in final["targets"] if r["pass"] is not None]
    partial = "" if final["complete"] else f" (of the families that ran: {', '.join(f for f in done if f not in final['failed_families'])})"
    print(f"\n{sum(r['pass'] for r in checks)}/{len(checks)} targets met{partial}; "
          f"{final['settings']['total_seconds']} s on {final['machine']['cores']} cores "
          f"({final['machine']['cpu']}{cpu_id(final['machine'])}), torch threads {args.threads}, {args.clock} clock, "
          f"{final['settings']['precision']}.")
    if args.json is not None:
        _write(args.json, final)
        print(f"wrote {args.json}")
    if failed:
        raise SystemExit(f"benchmark families failed: {', '.join(f'{k} ({v})' for k, v in failed.items())}.")
    return final


def cpu_id(machine: dict) -> str:
    """`` family F model M, AVX512 + AMX + native bf16`` for the summary line (what tells hosts apart)."""
    family, model = machine.get("cpu_family"), machine.get("cpu_model")
    parts = [f"family {family} model {model}"] if family and model else []
    isa = machine.get("isa")
    if isa:
        parts.append(isa + (" + AMX" if machine.get("amx") else "") + (" + native bf16" if machine.get("native_bf16") else ""))
    return "".join(", " + p for p in parts)


def _write(path: Path, report: dict[str, Any]) -> None:
    """Writes the JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
