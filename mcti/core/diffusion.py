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


@torch.no_grad()
def separation_by_t(
    bundle: ModelBundle,
    cond: torch.Tensor,
    x0: torch.Tensor,
    labels: torch.Tensor,
    bins: int = 10,
    draws: int = 1,
    seed: int = 0,
    batch_rows: int = 256,
) -> torch.Tensor:
    """How well each band of timesteps separates the classes, measured on labelled latents
    (the token set's shots): x0 (S, C, h, w), labels (S,), cond (K, L, d). For each of `bins`
    equal bands of [0, T) (its centre, `draws` noises shared by all classes) the paired margins
    d = err(other class) - err(true class) give the ratio of between-class to within-class
    variance, max(mean d, 0)^2 / var d: the information one UNet row at that t adds to the
    scorer's significance test. Returns (bins,) float weights (0 where the band does not
    separate), deterministic for a seed; S x K x bins x draws UNet rows."""
    S, K, T = len(x0), len(cond), bundle.num_train_timesteps
    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor([int((b + 0.5) * T / bins) for b in range(bins)]).repeat_interleave(draws)
    P = len(t)  # (image, t, eps) pairs per image
    eps = torch.randn(P, *x0.shape[1:], generator=gen).to(x0.device)
    t_all = t.repeat(S).to(x0.device)
    x_t, target = noised(bundle, x0.repeat_interleave(P, 0), t_all, eps.repeat(S, 1, 1, 1))
    pair = torch.arange(S * P, device=x0.device).repeat_interleave(K)  # rows: (pair, class)
    cls = torch.arange(K, device=x0.device).repeat(S * P)
    errs = torch.cat(
        [
            row_errors(
                bundle, x_t, t_all, target, pair[i : i + batch_rows], cond[cls[i : i + batch_rows]]
            )
            for i in range(0, len(pair), batch_rows)
        ]
    ).view(S, bins, draws, K)
    return separation_ratio(errs, labels)


def separation_ratio(errs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """errs (S, bins, draws, K) per-class errors of labelled images, labels (S,) -> (bins,)
    max(mean d, 0)^2 / var d over the margins d = err(other class) - err(true class)."""
    S, bins, draws, K = errs.shape
    true = errs.gather(3, labels.view(S, 1, 1, 1).expand(S, bins, draws, 1).to(errs.device))
    others = torch.ones(S, K, dtype=torch.bool).scatter_(1, labels.view(S, 1).cpu(), False)
    mask = others.view(S, 1, K).expand(S, draws, K)
    d = (errs - true).permute(1, 0, 2, 3).cpu()[:, mask]  # (bins, S * draws * (K - 1)) margins
    d = d.double()
    return (d.mean(1).clamp(min=0) ** 2 / d.var(1).clamp(min=1e-30)).float()
