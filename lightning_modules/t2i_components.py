"""Stable Diffusion components for TextToImage: loaded from a hub id / local dir, or built tiny.

A local directory must have the ``runwayml/stable-diffusion-v1-5`` layout: subfolders ``unet``,
``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler``. The tiny build (tests, offline demo) is
random-initialised with a fixed seed, so the same arguments always give the same weights; its CLIP
tokenizer is written from a small word list (unknown words fall back to characters).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: SD v1.x noise schedule (used for the tiny build; a pretrained model brings its own).
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
TINY_WORDS = (
    "a an the of in on at with and no or is are image scan chest x ray xray lung lungs left right "
    "upper lower middle small large round oval irregular bright faint dense lesion lesions nodule "
    "mass opacity normal findings finding benign malignant breast ultrasound tissue shows showing "
    "demonstrates exhibiting features single two both side heart clear"
).split()


@dataclass
class Components:
    """The frozen and trainable parts of a Stable Diffusion model."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]

    @property
    def vae_factor(self) -> int:
        """Pixel size of one latent cell (8 for SD)."""
        return vae_factor(self.vae)


def vae_factor(vae: nn.Module) -> int:
    """Pixel size of one latent cell of an ``AutoencoderKL`` (each level but the last halves the image)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_components(pretrained: str) -> Components:
    """Loads every component from a hub id or a local directory (fp32)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(pretrained).expanduser()
    if local.is_dir():
        missing = [s for s in SUBFOLDERS if not (local / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"Stable Diffusion directory {local} (model.init_args.pretrained) lacks the subfolders "
                f"{missing}; it needs {list(SUBFOLDERS)} as in runwayml/stable-diffusion-v1-5."
            )
        pretrained = str(local)
    loaders = {
        "unet": UNet2DConditionModel.from_pretrained, "vae": AutoencoderKL.from_pretrained,
        "text_encoder": CLIPTextModel.from_pretrained, "tokenizer": CLIPTokenizer.from_pretrained,
        # The raw config (SD ships a PNDM one): DDIM sampling needs its steps_offset / set_alpha_to_one.
        "scheduler": DDPMScheduler.load_config,
    }
    parts: dict[str, Any] = {}
    for sub, load in loaders.items():
        try:
            parts[sub] = load(pretrained, subfolder=sub)
        except Exception as err:  # hub / file errors come in many types; the cause stays chained
            raise OSError(
                f"Could not load the Stable Diffusion '{sub}' from '{pretrained}' "
                f"({type(err).__name__}: {str(err)[:200]}); on an offline machine download the model "
                "once and set model.init_args.pretrained to its local directory (subfolders "
                f"{', '.join(SUBFOLDERS)})."
            ) from err
    return Components(
        unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"], scheduler_config={k: v for k, v in parts["scheduler"].items() if not k.startswith("_")},
    )


#: ``tiny`` layouts: "demo" (the offline demo's, fast) and "sd15" (Stable Diffusion v1.5's blocks at 1/4 width).
TINY_LAYOUTS = ("demo", "sd15")


def tiny_layout(tiny: bool | str) -> str:
    """The layout a ``tiny`` setting means: true is the demo's, a string names one of ``TINY_LAYOUTS``."""
    if tiny is True:
        return "demo"
    if isinstance(tiny, str) and tiny in TINY_LAYOUTS:
        return tiny
    raise ValueError(
        f"tiny={tiny!r} is not a known tiny layout; use true or 'demo' (the offline demo's model) or 'sd15' "
        "(Stable Diffusion v1.5 at 1/4 width)."
    )


def build_tiny_components(image_size: int, seed: int = 0, layout: bool | str = "demo") -> Components:
    """A small random-initialised SD model (same arguments, same weights); ``layout`` as ``tiny_layout`` reads it.

    ``demo``: VAE of 3 levels (4x downsampling, 4 latent channels, no attention); UNet of 2 levels
    (32, 64 channels), cross attention in the lower level and the mid block; CLIP text encoder of 2
    layers, width 32.

    ``sd15``: Stable Diffusion v1.5's blocks with every width divided by 4, group widths and the
    UNet's and text encoder's head widths kept: VAE of 4 levels, 2 ResNet blocks each (8x downsampling, 32-128
    channels, mid-block attention); UNet of 4 levels (80, 160, 320, 320 channels), 2 blocks each,
    cross attention in the upper three and the mid block, heads of 40, 80 and 160; CLIP text encoder
    of 12 layers, width 192 (3 heads of 64). Its UNet and VAE have 1/16 of SD v1.5's parameters
    each, so they keep its proportions, which the demo's 4x VAE of 16-32 channels does not: the
    setting in which to measure what precomputed latents save. Attention stays at <= 16 x 16 up to
    128 px images.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd15 = tiny_layout(layout) == "sd15"
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae_levels = (32, 64, 128, 128) if sd15 else (16, 32, 32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2 if sd15 else 1, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * len(vae_levels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_levels),
            block_out_channels=vae_levels, sample_size=image_size, mid_block_add_attention=sd15,
            scaling_factor=1.0,
        )
        factor = vae_factor(vae)
        if sd15:
            unet = UNet2DConditionModel(
                sample_size=image_size // factor, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(80, 160, 320, 320), norm_num_groups=8, cross_attention_dim=192,
                attention_head_dim=2,  # diffusers' name for the number of heads: SD v1's head widths (40-160)
            )
        else:
            unet = UNet2DConditionModel(
                sample_size=image_size // factor, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            )
        width, layers, heads = (192, 12, 3) if sd15 else (32, 2, 4)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=width, intermediate_size=(4 if sd15 else 2) * width,
                num_hidden_layers=layers, num_attention_heads=heads,
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        calibrate_tiny_vae(vae, image_size)
    return Components(unet, vae, text_encoder, tokenizer, dict(SD_SCHEDULE))


@torch.no_grad()
def calibrate_tiny_vae(vae: nn.Module, image_size: int) -> None:
    """Makes a random VAE behave like a trained one where diffusion training cares.

    A trained SD VAE has a near-deterministic posterior and latents scaled to unit variance
    (``scaling_factor``); at random init the posterior std is ~1, which would bury the image in
    noise. The log-variance bias is set to -12 (std ~0.0025) and the scaling factor to
    1 / std(latent means) over a fixed batch of smooth random images.
    """
    channels = vae.config.latent_channels
    vae.quant_conv.bias[channels:] = -12.0
    coarse = torch.rand(8, 3, 4, 4) * 2 - 1
    probe = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear")
    std = float(vae.encode(probe).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=round(1.0 / max(std, 1e-6), 4))


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def tiny_tokenizer(words: tuple[str, ...] = TINY_WORDS, max_length: int = 77) -> Any:
    """A CLIP BPE tokenizer over single bytes plus whole-word merges for ``words``."""
    from transformers import CLIPTokenizer

    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        parts = [*word[:-1], word[-1] + "</w>"]
        current = parts[0]
        for nxt in parts[1:]:
            if (current, nxt) not in merges:
                merges.append((current, nxt))
            current += nxt
            if current not in vocab_list:
                vocab_list.append(current)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}))
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(
            str(vocab_file), str(merges_file), model_max_length=max_length,
            bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )
