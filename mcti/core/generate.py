"""Draw images of a class with its token (DDIM, classifier-free guidance), with or without a VAE.

Pixel-space models (no VAE) get two settings that their samples need:
- every x0 estimate is clipped to the data range [-1, 1] (diffusers' `clip_sample`). The
  sampler estimates x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); at the first steps
  (1 / sqrt(abar_t) ~ 76 at t = 924 of 1000) an error of 0.1 in a predicted noise value moves
  that pixel of x0 by 7.6; the embedded model's first estimates reached |x0| = 10-22;
- ancestral sampling (eta = 1): each step adds fresh noise, so the errors of one step are
  partly forgotten instead of carried to the end, as deterministic DDIM (eta = 0) does.
On the embedded model, deterministic unclipped DDIM turned about half of all samples (learned
tokens, true names and the empty prompt alike) into saturated coloured noise; with both
settings none of 320 were (README, "Generation quality"). Latents of a VAE have no fixed range
and keep the previous behaviour: no clipping, eta = 0.
"""

import math

import numpy as np
import torch
from PIL import Image

from mcti.core.model import ModelBundle
from mcti.core.tokens import TokenSet, TokenTable


def ddim_scheduler(bundle: ModelBundle, steps: int):
    """DDIM on the model's own noise schedule, `steps` timesteps; x0 clipped in pixel space."""
    from diffusers import DDIMScheduler

    pixel_space = bundle.vae is None
    sched = DDIMScheduler.from_config(
        bundle.scheduler.config, clip_sample=pixel_space, clip_sample_range=1.0
    )
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def generate(
    bundle: ModelBundle,
    tokens: TokenSet,
    table: TokenTable,
    k: int,
    n: int = 4,
    template: str = "a photo of a {}",
    steps: int = 15,
    guidance: float = 3.0,
    seed: int = 0,
    progress=None,
    eta: float | None = None,
) -> torch.Tensor:
    """n images of class k -> (n, 3, H, W) in [-1, 1].

    eta: DDIM's stochasticity, 0 (deterministic) to 1 (ancestral, DDPM-like); None: 1 in pixel
    space, 0 with a VAE (see the module docstring). Each step's fresh noise comes from the same
    seeded generator, so the images stay a function of `seed`.
    """
    sched = ddim_scheduler(bundle, steps)
    if eta is None:
        eta = 1.0 if bundle.vae is None else 0.0
    cond, _ = tokens.encode(table, [tokens.prompt(k, template)] * n)  # (n, L, d)
    uncond, _ = tokens.encode(None, [""] * n)
    ctx = torch.cat([uncond, cond]).to(bundle.dtype)  # (2n, L, d)
    unet = bundle.unet
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * sched.init_noise_sigma).to(bundle.device)
    for t in sched.timesteps if progress is None else progress(sched.timesteps):
        inp = sched.scale_model_input(torch.cat([x, x]), t).to(bundle.dtype)
        out_u, out_c = unet(inp, t, encoder_hidden_states=ctx).sample.float().chunk(2)
        guided = out_u + guidance * (out_c - out_u)  # (n, C, h, w)
        x = sched.step(guided, t, x, eta=eta, generator=gen).prev_sample
    return bundle.decode(x)


def to_grid(images: torch.Tensor, cols: int | None = None, upscale_to: int = 0) -> Image.Image:
    """(n, 3, H, W) in [-1, 1] -> one PIL grid image; tiles enlarged (nearest) to upscale_to px."""
    n, _, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = arr[i]
    im = Image.fromarray(grid)
    if upscale_to > h:
        f = upscale_to // h
        im = im.resize((im.width * f, im.height * f), Image.NEAREST)
    return im
