"""Shared denoising machinery: noising, targets, and per-row UNet errors (one code path for the
scorer and the training objectives)."""

import torch

from kernels import denoise_errors
from mcti.core.model import ModelBundle


def add_noise(
    scheduler, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0, eps (P, C, H, W), t (P,) -> x_t and the regression target (eps or v) of a DDPM
    scheduler's noise schedule and prediction type."""
    a = scheduler.alphas_cumprod.to(x0.device)[t.to(x0.device)].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return x_t, eps
    if prediction_type == "v_prediction":
        return x_t, a.sqrt() * eps - (1 - a).sqrt() * x0
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def noised(
    bundle: ModelBundle, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_noise` with the bundle's scheduler."""
    return add_noise(bundle.scheduler, x0, t, eps)


def row_errors(
    bundle: ModelBundle,
    x_t: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor,
    pair_index: torch.Tensor,
    cond: torch.Tensor,
) -> torch.Tensor:
    """Per-row denoising error through the UNet.

    x_t, target (P, C, H, W) and t (P,) describe P (image, t, eps) pairs; row r runs pair
    `pair_index[r]` under conditioning `cond[r]` (R, L, d). Returns (R,) float32 errors; the
    pair tensors are gathered for the UNet input only, never for the target (the kernel indexes).
    """
    x = x_t[pair_index].to(bundle.dtype)  # (R, C, H, W)
    pred = bundle.unet(x, t[pair_index], encoder_hidden_states=cond.to(bundle.dtype)).sample
    return denoise_errors(pred, target.to(pred.dtype), pair_index)
