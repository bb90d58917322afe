"""generate(): shapes, determinism by seed, and that the embedded model's samples are images,
not noise, by the measure of mcti.eval.noise (real images of the same dataset as reference)."""

import pytest
import torch

from mcti.core.generate import ddim_scheduler, generate
from mcti.core.tokens import TokenSet, TokenTable
from mcti.eval.noise import HALF_NYQUIST, high_freq_share, noise_fraction


def _tokens(bundle, words: list[str]) -> tuple[TokenSet, TokenTable]:
    """One token per word, each set to that word's own embedding (a learned token's stand-in
    that the model knows)."""
    tokens = TokenSet(bundle, len(words))
    table = TokenTable(len(words), 1, torch.zeros(bundle.hidden_size))
    with torch.no_grad():
        table.vectors.copy_(torch.stack([tokens.init_vector(w) for w in words]))
    return tokens, table


def test_shapes_and_range(tiny_bundle):
    tokens, table = _tokens(tiny_bundle, ["cat", "dog"])
    images = generate(tiny_bundle, tokens, table, 1, n=3, steps=2, guidance=2.0)
    assert images.shape == (3, 3, tiny_bundle.resolution, tiny_bundle.resolution)
    assert images.dtype == torch.float32
    assert float(images.min()) >= -1 and float(images.max()) <= 1


def test_same_seed_same_images_other_seed_other_images(tiny_bundle):
    tokens, table = _tokens(tiny_bundle, ["cat", "dog"])
    a = generate(tiny_bundle, tokens, table, 0, n=2, steps=3, seed=5)
    b = generate(tiny_bundle, tokens, table, 0, n=2, steps=3, seed=5)
    c = generate(tiny_bundle, tokens, table, 0, n=2, steps=3, seed=6)
    d = generate(tiny_bundle, tokens, table, 1, n=2, steps=3, seed=5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)


def test_x0_is_clipped_in_pixel_space_only(tiny_bundle):
    """Latents of a VAE (tiny-random) have no fixed range; pixels (no VAE) lie in [-1, 1]."""
    assert tiny_bundle.vae is not None
    assert not ddim_scheduler(tiny_bundle, 4).config.clip_sample
    pixel = ddim_scheduler(_pixel_bundle(), 4)
    assert pixel.config.clip_sample and pixel.config.clip_sample_range == 1.0
    assert len(pixel.timesteps) == 4


def test_latent_models_keep_deterministic_ddim(tiny_bundle):
    """eta defaults to 0 with a VAE (the behaviour before pixel-space models got eta = 1)."""
    tokens, table = _tokens(tiny_bundle, ["cat"])
    default = generate(tiny_bundle, tokens, table, 0, n=2, steps=3)
    assert torch.equal(default, generate(tiny_bundle, tokens, table, 0, n=2, steps=3, eta=0.0))
    assert not torch.allclose(
        default, generate(tiny_bundle, tokens, table, 0, n=2, steps=3, eta=1.0)
    )


def test_noise_measure_on_tiny_random_samples(tiny_bundle):
    """Documented properties on real sampler output: one share per image in [0, 1], above
    white noise's ~0.8 never, and no sample counts as noise against itself as reference."""
    tokens, table = _tokens(tiny_bundle, ["cat"])
    images = generate(tiny_bundle, tokens, table, 0, n=4, steps=3)
    share = high_freq_share(images)
    assert share.shape == (4,) and HALF_NYQUIST == 0.25
    assert float(share.min()) >= 0 and float(share.max()) <= 1
    assert noise_fraction(images, images) == 0.0
    white = torch.rand(4, 3, *images.shape[-2:], generator=torch.Generator().manual_seed(0))
    assert noise_fraction(white * 2 - 1, images) == 1.0


def _has_animal() -> bool:
    try:
        import animal_mnist  # noqa: F401

        return True
    except ImportError:
        return False


_EMBEDDED = {}


def _pixel_bundle():
    """The embedded model: pixel space (16x16 RGB, no VAE)."""
    if not _EMBEDDED:
        from mcti.core.model import load_model

        _EMBEDDED["b"] = load_model("embedded", device="cpu")
    return _EMBEDDED["b"]


@pytest.mark.skipif(not _has_animal(), reason="animal-mnist not installed")
def test_embedded_samples_are_not_noise():
    """At the demo's settings (15 steps, guidance 3) with tokens the model knows. Before x0 was
    clipped, 9 of these 16 samples (about half over the demo's 10 classes too) were saturated
    noise, above every one of 400 real held-out images in high-frequency energy."""
    import numpy as np
    from PIL import Image

    from mcti.data.folders import pil_to_tensor
    from mcti.data.offline import load_split

    bundle = _pixel_bundle()
    split = load_split("animal-mnist")
    real_idx = np.random.default_rng(0).permutation(split.held_out)[:400]
    real = torch.stack(
        [
            pil_to_tensor(Image.fromarray(split.images[i]).convert("RGB"), bundle.resolution)
            for i in real_idx
        ]
    )  # (400, 3, 16, 16)
    tokens, table = _tokens(bundle, ["cat", "horse"])
    samples = torch.cat(
        [generate(bundle, tokens, table, k, n=8, steps=15, guidance=3.0, seed=k) for k in (0, 1)]
    )  # (16, 3, 16, 16)
    assert noise_fraction(samples, real) <= 1 / 16
