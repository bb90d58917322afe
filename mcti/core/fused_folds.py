"""Out-of-fold evidence for the fused scorer (`mcti train --fit-folds K`): the weights of its
parts are fitted on scores of shots that the scoring tokens never trained on.

The shots are split in K folds (each holds about 1/K of every class's shots); the training loop
(mcti.train.loop.fold_tables) trains one extra token table per fold on the other folds, with the
same settings and steps. Each held-out shot is then scored by its fold's tokens: CLIP cosines,
and denoising errors of the cache's top m classes (the cache itself is leave-one-out, so it is
honest without folds). `fit_fused` fits the weights on these scores; the full-data tokens ship
with them. Cost: K extra trainings and N x m x timesteps UNet rows.
"""

import torch

from mcti.core.fused import FusedParams, FusedState, fit_fused
from mcti.core.model import ModelBundle
from mcti.core.scoring import DiffusionScorer
from mcti.core.tokens import TEMPLATES, TokenSet, TokenTable


def shot_folds(labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) labels -> (N,) fold of each shot: its index among its class's shots, modulo k."""
    fold = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        fold[idx] = torch.arange(len(idx)) % k
    return fold


@torch.no_grad()
def fit_with_folds(
    bundle: ModelBundle,
    tokens: TokenSet,
    fold_tables: list[TokenTable],
    folds: torch.Tensor,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    template: str = TEMPLATES[0],
    diffusion_m: int = 3,
    diffusion_timesteps: int = 8,
    batch_rows: int = 256,
    seed: int = 0,
) -> FusedState:
    """The fused state fitted on out-of-fold scores: pixels (N, 3, H, W) and labels (N,) of the
    shots, folds (N,) their folds, fold_tables[j] trained without fold j. diffusion_m 0: no
    diffusion part."""
    feats = bundle.clip_image_features_cpu(pixels)  # (N, P)
    x0 = torch.cat([bundle.encode_images(pixels[i : i + 32]) for i in range(0, len(pixels), 32)])
    K, N = tokens.num_classes, len(labels)
    cache_only = fit_fused(feats, labels, K, None)
    cand = cache_only.candidates(cache_only.cache_logp(feats, leave_out=True))  # (N, m)
    params = FusedParams(diffusion_m=diffusion_m, diffusion_timesteps=diffusion_timesteps)
    prompts = [tokens.prompt(k, template) for k in range(K)]
    token_cos = torch.zeros(N, K)
    diffusion = torch.full((N, K), -torch.inf) if diffusion_m > 0 else None
    rows = 0
    for j, table in enumerate(fold_tables):
        held = (folds == j).nonzero().squeeze(1)
        if not len(held):
            continue
        text = tokens.clip_text_features(table, prompts).float().cpu()  # (K, P)
        token_cos[held] = feats[held] @ text.T
        if diffusion is not None:
            cond = tokens.class_conditioning(table, template)  # (K, L, d)
            scorer = DiffusionScorer.for_fused(bundle, cond, params, batch_rows, seed)
            s = scorer.score_latents(x0[held], candidates=cand[held].to(x0.device))
            diffusion[held] = s.scores.float()
            rows += s.unet_rows
    state = fit_fused(
        feats, labels, K, token_cos, diffusion=diffusion, folds=len(fold_tables),
        diffusion_m=diffusion_m, diffusion_timesteps=diffusion_timesteps,
    )  # fmt: skip
    state.params.evidence["fit_unet_rows"] = rows
    return state
