"""The noise measure on synthetic images: smooth images vs white noise."""

import pytest
import torch

from mcti.eval.noise import high_freq_share, is_noise, noise_fraction, noise_threshold


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: 4x4 random colours upsampled bilinearly (no fine detail)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")


def white_noise(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 2 - 1).clamp(-1, 1)


def test_white_noise_share_is_the_high_frequency_area():
    """White noise spreads its energy evenly, so its share is the fraction of (non-DC) frequency
    bins beyond half Nyquist: ~0.80 (1 - pi/16 in the continuum)."""
    size = 32
    f = torch.fft.fftfreq(size)
    radius = (f.view(-1, 1).square() + f.view(1, -1).square()).sqrt()
    expected = float((radius > 0.25).sum()) / (size * size - 1)
    share = high_freq_share(white_noise(64, size))
    assert share.shape == (64,)
    assert abs(float(share.mean()) - expected) < 0.02
    assert float(share.min()) > 0.7


def test_smooth_images_have_little_high_frequency_energy():
    share = high_freq_share(smooth_images(64))
    assert float(share.max()) < 0.05


def test_share_ignores_brightness_and_contrast():
    x = smooth_images(8) * 0.5
    torch.testing.assert_close(high_freq_share(x), high_freq_share(x * 0.3 + 0.2))
    assert high_freq_share(torch.full((2, 3, 16, 16), 0.7)).tolist() == [0.0, 0.0]


def test_noise_fraction_against_real_images():
    real = smooth_images(50, seed=2)
    assert noise_fraction(white_noise(20), real) == 1.0
    # fresh images of the same kind: each exceeds the max of 50 with chance 1/51
    assert noise_fraction(smooth_images(20, seed=3), real) <= 0.1
    # the real images themselves: none above their own max, about half above their median
    assert noise_fraction(real, real) == 0.0
    assert 0.4 <= noise_fraction(real, real, quantile=0.5) <= 0.6
    mixed = torch.cat([smooth_images(6, seed=4), white_noise(2)])
    assert is_noise(mixed, noise_threshold(real)).tolist() == [False] * 6 + [True] * 2


def test_quantile_out_of_range_is_refused():
    with pytest.raises(ValueError, match="quantile"):
        noise_threshold(smooth_images(4), quantile=0.0)
