"""Per-row denoising error: weight[r] * mean((eps_pred[r] - eps[image_index[r]]) ** 2).

Placeholder PyTorch path; the Triton kernel, launcher and autograd.Function land here.
"""

import torch


def denoise_errors(
    eps_pred: torch.Tensor,
    eps: torch.Tensor,
    image_index: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """(R, *S) predictions vs (B, *S) per-image noise -> (R,) float32 errors."""
    diff = eps_pred.float().flatten(1) - eps.float().flatten(1)[image_index]  # (R, N)
    err = diff.pow(2).mean(dim=1)
    return err if weight is None else err * weight.float()
