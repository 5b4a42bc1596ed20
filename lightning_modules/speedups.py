"""Kernel and layout choices that make training faster without changing what is computed.

Each choice gives the same results as the default path up to float rounding (tests/test_speedups.py):

- Attention: on CPU under bf16 autocast, timm's fused attention (``scaled_dot_product_attention``,
  whose CPU flash kernel has a slow bf16 backward) trains ViT attention 1.6-2.8x slower than the
  explicit softmax(QK^T / sqrt(d)) V of the same timm module (measured at 197-577 tokens on a CPU
  with native bf16). The explicit path keeps the B x heads x N x N attention probabilities for the
  backward pass (ViT-B/16 at 224 px, batch 32: ~1 GB), so it is only chosen up to
  ``EXPLICIT_ATTENTION_MAX_TOKENS`` tokens per image. In fp32 the fused kernel wins on CPU too
  (ViT-S, 224 px, batch 8, one AVX2 thread: full fine-tuning step 0.93x, PEFT steps 0.95-0.97x,
  inference 0.94x; and it keeps no N x N probabilities: 17% less peak training memory for full
  fine-tuning, 26% for SSF), so it is kept there.
- channels_last: oneDNN convolutions run ~25% faster on NHWC tensors (ResNet-50, bf16, CPU).
- fused AdamW: one kernel over all tensors of a parameter group instead of a Python loop over them.
- CPU allocator (``keep_freed_memory``): glibc malloc hands freed activations back to the kernel and
  takes fresh zeroed pages on the next step. A ViT-S fp32 training step at batch 8 paid up to 110k
  minor page faults for that, a count that varied from step to step and process to process, at
  2.5-4 us each (measured on a 2-core AVX2 VM: up to 0.4 s of a 3.4 s step). Kept, it is 0-2k.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn

#: Above this many tokens per image (224-256 px ViTs have 197-257) the quadratic memory of the
#: explicit attention outweighs its speed; timm's fused attention is kept.
EXPLICIT_ATTENTION_MAX_TOKENS = 400


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switches timm's fused attention on or off in every module that has the switch; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = enabled
            count += 1
    return count


def uses_fused_attention(model: nn.Module) -> bool:
    """Whether ``model`` has timm attention modules and every one of them runs the fused kernel."""
    switches = [m.fused_attn for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    return bool(switches) and all(switches)


def token_count(model: nn.Module) -> int | None:
    """Tokens per image of a timm ViT (patches + prefix tokens), None when the model has no patch grid."""
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if not isinstance(patches, int):
        return None
    return patches + int(getattr(model, "num_prefix_tokens", 0) or 0)


def prefers_fused_attention(model: nn.Module, device: torch.device | str, precision: str | None = "32-true") -> bool:
    """Whether timm's fused attention is the faster choice for ``model`` on ``device`` at ``precision``.

    Fused everywhere except on CPU under bf16 autocast (``bf16-mixed``, where it was measured), where
    the explicit path is faster as long as the N x N scores stay small (``EXPLICIT_ATTENTION_MAX_TOKENS``).
    """
    if torch.device(device).type != "cpu" or str(precision) != "bf16-mixed":
        return True
    tokens = token_count(model)
    return tokens is not None and tokens > EXPLICIT_ATTENTION_MAX_TOKENS


def is_convolutional(model: nn.Module) -> bool:
    """A CNN (or hybrid): more than one Conv2d, so NHWC layouts pay off (a ViT has one, its patch embedding)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def to_channels_last(model: nn.Module) -> nn.Module:
    """Stores every 4-D weight of ``model`` in NHWC (channels_last) order, in place."""
    return model.to(memory_format=torch.channels_last)


def can_fuse_adamw(params: Iterable[torch.Tensor]) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` supports these tensors (float, on CPU or CUDA)."""
    params = list(params)
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: Largest block served from the heap (above: its own mmap): glibc's maximum on 64-bit, 32 MiB.
#: Free heap memory is given back to the kernel only above 2 GiB (mallopt takes an int), and the heap
#: grows 64 MiB at a time.
ALLOCATOR_SETTINGS = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 2**31 - 1, _M_TOP_PAD: 64 * 2**20}
#: ``MEDPEFT_CPU_ALLOCATOR=default`` keeps glibc's own behaviour.
ALLOCATOR_ENV = "MEDPEFT_CPU_ALLOCATOR"


def _interposed_malloc() -> bool:
    """Whether the process's ``malloc`` is not glibc's (jemalloc, tcmalloc... preloaded or linked in)."""
    address = lambda lib: ctypes.cast(lib.malloc, ctypes.c_void_p).value  # noqa: E731
    return address(ctypes.CDLL(None)) != address(ctypes.CDLL("libc.so.6"))


def _glibc_mallopt() -> Callable[[int, int], int]:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def keep_freed_memory() -> str:
    """Makes glibc malloc keep freed memory for the next training step instead of returning it to the kernel.

    Blocks up to 32 MiB come from the heap, and the heap is not trimmed below 2 GiB of free memory.
    Process-wide and irreversible (DataLoader workers forked later inherit it). Left unchanged with
    ``MEDPEFT_CPU_ALLOCATOR=default``, on other C libraries, under another allocator (jemalloc,
    tcmalloc... preloaded or linked in), and when the environment sets glibc malloc options
    (``MALLOC_*``, ``GLIBC_TUNABLES`` with ``glibc.malloc``). Returns what was done.
    """
    if os.environ.get(ALLOCATOR_ENV, "").lower() == "default":
        return f"unchanged: {ALLOCATOR_ENV}=default"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "unchanged: not glibc"
    if any(name.startswith("MALLOC_") for name in os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "unchanged: glibc malloc options set in the environment"
    try:
        if _interposed_malloc():
            return "unchanged: another allocator replaces glibc's malloc"
        mallopt = _glibc_mallopt()
    except (OSError, AttributeError):
        return "unchanged: glibc's malloc / mallopt not found"
    refused = [param for param, value in ALLOCATOR_SETTINGS.items() if mallopt(param, value) != 1]
    if refused:
        return f"partly set: glibc refused mallopt parameters {refused}"
    return "glibc malloc keeps freed memory (heap blocks up to 32 MiB, trimmed above 2 GiB free)"
