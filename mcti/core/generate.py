"""Draw images of a class with its token (DDIM, classifier-free guidance), with or without a VAE.

Pixel-space models (no VAE) need every x0 estimate clipped to the data range [-1, 1]. The
sampler estimates x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), so at the first steps
(1 / sqrt(abar_t) ~ 76 at t = 924 of 1000) a 1% error in the predicted noise becomes an x0
that is tens of units outside [-1, 1]. Deterministic DDIM never corrects it: on the embedded
model about half of all samples (unconditional, true names and learned tokens alike) ended as
saturated coloured noise. Clipping x0 (diffusers' `clip_sample`) puts them back on the image
range; latents of a VAE have no fixed range and are left unclipped.
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
    steps: int = 25,
    guidance: float = 5.0,
    seed: int = 0,
    progress=None,
) -> torch.Tensor:
    """n images of class k -> (n, 3, H, W) in [-1, 1]."""
    sched = ddim_scheduler(bundle, steps)
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
        x = sched.step(out_u + guidance * (out_c - out_u), t, x).prev_sample
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
