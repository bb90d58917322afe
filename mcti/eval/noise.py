"""Is a generated image noise? Its share of high-frequency energy, against real images.

A sample that the sampler failed to denoise keeps much of its energy at high spatial
frequencies (white noise: ~80% above half Nyquist), while real images, even small ones with
sharp edges, keep most of theirs at low frequencies. A generated image counts as noise when its
share is above every real image of the same dataset (or a chosen quantile of them).
"""

import torch

HALF_NYQUIST = 0.25  # cycles per pixel (Nyquist is 0.5)


def high_freq_share(images: torch.Tensor, cutoff: float = HALF_NYQUIST) -> torch.Tensor:
    """(N, C, H, W) -> (N,) share of each image's non-DC spectral energy at radial frequency
    above `cutoff` cycles/pixel, summed over channels. A constant image has share 0."""
    x = images.float()
    x = x - x.mean(dim=(-2, -1), keepdim=True)  # drop DC per channel: brightness is not detail
    power = torch.fft.fft2(x).abs().square().sum(1)  # (N, H, W)
    h, w = power.shape[-2:]
    fy, fx = torch.fft.fftfreq(h).view(-1, 1), torch.fft.fftfreq(w).view(1, -1)
    high = (fy.square() + fx.square()).sqrt() > cutoff  # (H, W)
    total = power.sum(dim=(-2, -1))  # (N,)
    share = (power * high).sum(dim=(-2, -1)) / total.clamp(min=1e-12)
    return torch.where(total > 1e-12, share, torch.zeros_like(share))


def noise_threshold(real: torch.Tensor, quantile: float = 1.0) -> float:
    """The high-frequency share that real images (N, C, H, W) do not exceed: their max
    (quantile 1.0) or a quantile of them."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], not {quantile}")
    return float(torch.quantile(high_freq_share(real), quantile))


def is_noise(generated: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N, C, H, W) -> (N,) bool: high-frequency share above the real images' threshold."""
    return high_freq_share(generated) > threshold


def noise_fraction(generated: torch.Tensor, real: torch.Tensor, quantile: float = 1.0) -> float:
    """Fraction of generated images (N, C, H, W) whose high-frequency share is above
    `quantile` of the real images' shares (both at the same resolution, in the same range)."""
    return float(is_noise(generated, noise_threshold(real, quantile)).float().mean())
