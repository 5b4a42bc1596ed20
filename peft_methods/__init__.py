"""PEFT methods behind one interface (see ``peft_methods.base.PeftMethod``)."""

from peft_methods.adapters import Adapter, AdaptFormer
from peft_methods.base import PeftMethod, build_method, count_params
from peft_methods.convpass import Convpass
from peft_methods.diffusion import DiffFit, SVDiff
from peft_methods.fact import FacT
from peft_methods.lora import DoRA, LoHa, LoKr, LoRA, VeRA
from peft_methods.multiplicative import BOFT, IA3, OFT
from peft_methods.selective import (
    AttentionTuning,
    BitFit,
    FullFineTuning,
    LinearProbe,
    NormBiasAttention,
    NormTuning,
)
from peft_methods.ssf import SSF
from peft_methods.tsa import TSA
from peft_methods.vpt import VPT

#: Every method class; the invariant test suite iterates over this tuple.
ALL_METHODS: tuple[type[PeftMethod], ...] = (
    FullFineTuning,
    LinearProbe,
    BitFit,
    NormTuning,
    AttentionTuning,
    NormBiasAttention,
    VPT,
    Adapter,
    AdaptFormer,
    Convpass,
    SSF,
    FacT,
    TSA,
    DiffFit,
    SVDiff,
    LoRA,
    DoRA,
    LoHa,
    LoKr,
    OFT,
    BOFT,
    IA3,
    VeRA,
)

__all__ = [
    "ALL_METHODS",
    "BOFT",
    "AdaptFormer",
    "Adapter",
    "AttentionTuning",
    "BitFit",
    "Convpass",
    "DoRA",
    "DiffFit",
    "FacT",
    "FullFineTuning",
    "IA3",
    "LinearProbe",
    "LoHa",
    "LoKr",
    "LoRA",
    "NormBiasAttention",
    "NormTuning",
    "OFT",
    "PeftMethod",
    "SSF",
    "SVDiff",
    "TSA",
    "VPT",
    "VeRA",
    "build_method",
    "count_params",
]
