"""The training precision chosen per device when ``trainer.precision`` is null (``configs/base.yaml``).

bf16 autocast is only fast where the hardware computes bf16 natively. On a CPU without AVX512-BF16
or AMX (e.g. AMD Zen 3, most Intel client CPUs) oneDNN emulates it: a ViT-Tiny training step at
224 px ran 18x slower under bf16-mixed (24 s) than in 32-true (1.35 s) on an AMD EPYC with AVX2,
and an epoch of the offline demo (EfficientNet-Lite0, 96 px) 5.8x slower (42 s against 7.3 s).
So the default is bf16-mixed where bf16 is native (CUDA Ampere or newer, bf16-capable CPUs),
16-mixed on older CUDA GPUs (tensor cores; Lightning scales the loss), and 32-true elsewhere.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

#: What an explicit ``trainer.precision`` of these values costs on a CPU without native bf16.
_EMULATED_BF16 = ("bf16-mixed", "bf16", "bf16-true")
#: fp16 precisions (as Lightning names them): hardware fp16 on CUDA only.
_FP16 = ("16-mixed", "16-true")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (x86; bf16 GEMMs several times faster than AVX512-BF16's)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # an older torch without the probe
        return False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (x86: AVX512-BF16 or AMX; Arm: BF16 extension)."""
    cpu = getattr(torch, "cpu", None)
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
            return bool(cpu._is_avx512_bf16_supported()) or cpu_has_amx()
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older torch without the probes: assume emulation
        return False


def resolve_device(accelerator: Any) -> str:
    """The device type Lightning will train on for ``trainer.accelerator`` ("cuda", "mps" or "cpu")."""
    name = str(getattr(accelerator, "class_path", accelerator) or "auto").lower()
    if "cpu" in name:
        return "cpu"
    if name in ("auto", "gpu", "cuda") or "cuda" in name:
        if torch.cuda.is_available():
            return "cuda"
    if name in ("auto", "gpu", "mps") or "mps" in name:
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
    return "cpu"


def cuda_has_native_bf16() -> bool:
    """Whether GPU 0 computes bf16 in hardware (NVIDIA compute capability 8.0+, i.e. Ampere or newer).

    ``torch.cuda.is_bf16_supported()`` alone also says yes for emulated bf16 (V100, T4).
    """
    if torch.version.hip:  # ROCm: torch's own answer
        return bool(torch.cuda.is_bf16_supported())
    return torch.cuda.get_device_capability(0)[0] >= 8


def auto_precision(device: str, strategy: Any = None) -> tuple[str, str]:
    """(precision, why) for training on ``device`` with ``strategy``."""
    if device == "cuda":
        if _forks(strategy):
            # Probing the GPU would initialise CUDA here, which fork-based strategies forbid.
            return "16-mixed", "the GPU is not probed under a fork-based strategy; fp16 autocast with loss scaling"
        if cuda_has_native_bf16():
            return "bf16-mixed", "this GPU computes bf16 natively"
        return "16-mixed", "this GPU has no native bf16; fp16 autocast with loss scaling"
    if device == "cpu":
        if cpu_has_native_bf16():
            return "bf16-mixed", "this CPU computes bf16 natively"
        return "32-true", "this CPU has no native bf16 (AVX512-BF16 / AMX), where bf16 autocast is emulated and 5-18x slower"
    return "32-true", f"the safe default on {device}"


#: Lightning's legacy spellings and the names they stand for.
_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}
_FORK_STRATEGIES = ("fork", "notebook")


def unified(precision: Any) -> str:
    """``precision`` as Lightning names it (32 -> "32-true", "bf16" -> "bf16-mixed", ...)."""
    return _ALIASES.get(str(precision), str(precision))


def _forks(strategy: Any) -> bool:
    """Whether ``strategy`` (a name, a class_path + init_args config, or a Strategy) starts its
    processes by forking this one: ``ddp_fork``, ``ddp_notebook`` or ``start_method: fork``."""
    if isinstance(strategy, dict):
        class_path, init = strategy.get("class_path"), strategy.get("init_args")
    else:
        class_path, init = getattr(strategy, "class_path", strategy), getattr(strategy, "init_args", None)
    if any(k in str(class_path or "") for k in _FORK_STRATEGIES):
        return True
    start = init.get("start_method") if isinstance(init, dict) else getattr(init, "start_method", None)
    return (start or getattr(strategy, "_start_method", None)) == "fork"  # the latter: a DDPStrategy object


def runs_natively(precision: Any, device: str, strategy: Any = None) -> bool:
    """Whether ``device`` computes ``precision`` in hardware (a resumed run keeps it only then).

    Under a fork-based strategy the GPU is not probed (that would initialise CUDA before the fork):
    a CUDA precision is taken as native there.
    """
    name = unified(precision)
    if name in ("32-true", "64-true"):
        return device != "mps" or name == "32-true"  # MPS has no float64
    if device == "cuda" and _forks(strategy):
        return name in _FP16 or name in _EMULATED_BF16
    if name in _EMULATED_BF16:
        return (device == "cuda" and cuda_has_native_bf16()) or (device == "cpu" and cpu_has_native_bf16())
    return device == "cuda" and name in _FP16


#: Where a checkpoint records its run's precisions (the state of ``run.RunConfigSaver``).
RECORD_KEY = "RunConfigSaver"


def is_checkpoint_file(ckpt: Any) -> bool:
    """Whether ``ckpt`` names a local file (not "hpc", a registry name, a URL or a sharded folder)."""
    try:
        return Path(str(ckpt)).is_file()
    except OSError:  # e.g. a folder on the way that cannot be read
        return False


def recorded_precision(ckpt: Any) -> str | None:
    """The precision the run of checkpoint file ``ckpt`` started in, as it recorded it (None: not recorded,
    or not a readable local file; Lightning reports an unreadable one when it loads it).

    Only the checkpoint's structure is read: its tensors are memory-mapped, not loaded (a legacy,
    non-zip file cannot be mapped and is loaded whole).
    """
    if not is_checkpoint_file(ckpt):
        return None
    checkpoint = None
    for mmap in (True, False):
        try:
            checkpoint = torch.load(Path(str(ckpt)), map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:  # noqa: BLE001, S112 - any unreadable file, whatever torch raises for it
            continue
    callbacks = checkpoint.get("callbacks") if isinstance(checkpoint, dict) else None
    record = callbacks.get(RECORD_KEY) if isinstance(callbacks, dict) else None
    started = record.get("precision_started") if isinstance(record, dict) else None
    return unified(started) if started is not None else None


def emulates(precision: Any, device: str) -> bool:
    """Whether ``device`` runs ``precision`` although not natively (bf16 on a CPU or GPU without it)."""
    return unified(precision) in _EMULATED_BF16 and device in ("cpu", "cuda")


def slow_precision_warning(precision: Any, device: str) -> str | None:
    """A warning when an explicit bf16 precision will be emulated (and slow) on this CPU, else None."""
    if device != "cpu" or str(precision) not in _EMULATED_BF16 or cpu_has_native_bf16():
        return None
    return (
        f"trainer.precision={precision} on a CPU without native bf16 (AVX512-BF16 / AMX): bf16 is emulated "
        "and training runs 5-18x slower than 32-true; set trainer.precision to null to let the device choose."
    )
