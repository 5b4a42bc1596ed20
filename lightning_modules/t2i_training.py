"""Training helpers for TextToImage: the diffusion loss, min-SNR weights and an EMA of trainable weights."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at ``timesteps``."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(ratio: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v targets."""
    clipped = ratio.clamp(max=gamma)
    return clipped / (ratio + 1.0) if prediction_type == "v_prediction" else clipped / ratio


def diffusion_loss(
    unet: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    snr_gamma: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise-prediction MSE at uniformly drawn timesteps (epsilon or v target, per the scheduler).

    ``generator`` (CPU) makes the noise and timesteps reproducible (validation); None uses the
    global RNG (training).
    """
    b = latents.shape[0]
    steps = scheduler.config.num_train_timesteps
    if generator is None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, steps, (b,), device=latents.device)
    else:
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        t = torch.randint(0, steps, (b,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    kind = scheduler.config.prediction_type
    target = scheduler.get_velocity(latents, noise, t) if kind == "v_prediction" else noise
    pred = unet(noisy, t, encoder_hidden_states=embeddings).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(snr(scheduler.alphas_cumprod, t), snr_gamma, kind)
    return per_sample.mean()


class TrainableEMA:
    """Exponential moving average of a module's trainable parameters (only those: adapters are small).

    Decay warms up as min(decay, (1 + n) / (10 + n)) over the n updates so far. ``swap_in`` puts the
    averages into the module (keeping the raw weights aside) and ``swap_out`` restores them.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {n: params[n].detach().clone().float() for n in self.names}
        self.num_updates = 0
        self.backup: dict[str, torch.Tensor] | None = None

    def _params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(module.named_parameters())
        for n in self.names:
            if self.shadow[n].device != params[n].device:
                self.shadow[n] = self.shadow[n].to(params[n].device)
        return {n: params[n] for n in self.names}

    @property
    def active(self) -> bool:
        return self.backup is not None

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for n, p in self._params(module).items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def swap_in(self, module: nn.Module) -> None:
        if self.active:
            return
        params = self._params(module)
        self.backup = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.copy_(self.shadow[n])

    @torch.no_grad()
    def swap_out(self, module: nn.Module) -> None:
        if self.backup is None:
            return
        for n, p in self._params(module).items():
            p.copy_(self.backup[n])
        self.backup = None

    def raw(self, name: str, current: torch.Tensor) -> torch.Tensor:
        """The trained (not averaged) value of parameter ``name``."""
        return self.backup[name] if self.backup is not None and name in self.backup else current

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {n: t.detach().cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.names) - set(state["shadow"]))
        if missing:
            raise ValueError(f"The checkpoint's EMA lacks {len(missing)} trainable tensors, e.g. {missing[:3]}.")
        self.num_updates = int(state["num_updates"])
        self.shadow = {n: state["shadow"][n].float() for n in self.names}
