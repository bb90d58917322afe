"""The fused scorer's state: a few-shot cache of the shots' CLIP image features, fused with the
class tokens' CLIP text scores and their diffusion errors, weighted by evidence from the shots,
calibrated.

Per image, each component becomes class log-probabilities (the common scale):
- cache (semantic-agnostic Tip-Adapter): affinity exp(-beta (1 - f . F_i)) to each shot i,
  averaged per class, log-normalised: `log_softmax(logmeanexp_{i in c} beta (f . F_i - 1))`;
- tokens: the clip scorer's cosines cos(f, text_c), z-scored over the classes of each image
  (their raw spread is tiny and varies per token set; softmax ignores the per-image shift).
- diffusion (optional): the tokens' denoising errors (mcti.core.scoring.DiffusionScorer) of the
  cache's top `diffusion_m` classes on a fixed grid of `diffusion_timesteps` (t, eps) pairs in
  the band where classes separate, so the UNet rows per image are m x timesteps, flat in K;
  -error / scale (`global`: one scale, the shots' median spread) or z-scored over the
  candidates (`zscore`), the other classes getting the candidates' minimum.
Fused logits are `w_cache * cache + w_tokens * tokens + w_diffusion * diffusion`, and `softmax`
of them is the calibrated output: the weights carry the temperature.

Fit, on the training shots alone: beta by the cache's leave-one-out log-likelihood (honest: a
shot never sees itself); both weights by the log-likelihood of the fused leave-one-out logits,
with a weak prior against weights above 1 (tokens often separate their own shots perfectly, where the
likelihood alone would send their weight to infinity). The tokens were trained on these shots,
so their shot scores are optimistic. Honest route (`mcti train --fit-folds K`,
mcti.core.fused_folds): K extra token sets, each trained without one fold of the shots, score the
held-out fold (token cosines, diffusion errors); the weights are fitted on those out-of-fold
scores, and the full-data tokens ship with them. Without folds, `token_shrink` multiplies the
token weight fitted on the optimistic scores (0: cache alone) and there is no diffusion part.
State: TOKENS/fused.safetensors (features, labels, and the out-of-fold scores the weights were
fitted on) + TOKENS/fused.json (the fitted numbers).
"""

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mcti.atomic import atomic_save_safetensors, atomic_write_json
from mcti.core.model import ModelBundle
from mcti.core.tokens import TEMPLATES, TokenSet, TokenTable
from mcti.errors import UserError

FUSED_TENSORS = "fused.safetensors"
FUSED_JSON = "fused.json"
FORMAT = "mcti-fused/1"
BETAS = (1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 50.0, 80.0)
TOKEN_SHRINK = 0.5  # fitted token weight kept (no folds); chosen a priori, see RESULTS.md
# bands of [0, T) the diffusion part's grid covers: benchmarks/diffusion_rows.py measured the
# classes separating at t < 800 and hardly above (separation by band .52 .58 .31 .40 .08)
DIFFUSION_BANDS = (1.0, 1.0, 1.0, 1.0, 0.0)
FORMS = ("global", "zscore")
REQUIRED = ("beta", "w_cache", "w_tokens", "token_shrink", "evidence")  # in every fused.json


@dataclass
class FusedParams:
    """The fitted numbers of a fused scorer (all fitted on the shots)."""

    beta: float = 10.0
    """Cache sharpness: affinity exp(-beta (1 - cosine))."""
    w_cache: float = 1.0
    """Weight of the cache's class log-probabilities in the fused logits."""
    w_tokens: float = 0.0
    """Weight of the tokens' class log-probabilities (after the shrink)."""
    token_shrink: float = TOKEN_SHRINK
    """Factor applied to the fitted token weight (1 with folds: their scores are out-of-fold)."""
    evidence: dict = field(default_factory=dict)
    """Leave-one-out accuracy and NLL on the shots of each component and of the fusion."""
    w_diffusion: float = 0.0
    """Weight of the diffusion part (0: not run; fitted on out-of-fold evidence only)."""
    diffusion_m: int = 3
    """Classes (the cache's top m) whose diffusion errors are measured per image."""
    diffusion_timesteps: int = 8
    """(t, eps) pairs per candidate class: UNet rows per image = diffusion_m x this."""
    diffusion_bands: list = field(default_factory=lambda: list(DIFFUSION_BANDS))
    """Weights of equal bands of [0, T) from which the grid is drawn (scoring.grid_from_weights)."""
    diffusion_form: str = "global"
    """global: -error / diffusion_scale; zscore: z-scored over each image's candidates."""
    diffusion_scale: float = 1.0
    """global form: the median over the shots of the spread of their candidates' errors."""
    folds: int = 0
    """Folds of the shots the weights were fitted on (0: on the tokens' own shots, shrunk)."""

    def diffusion_schedule(self) -> tuple[list[int], list[int]]:
        """The diffusion part's one-stage schedule (n_samples, to_keep)."""
        return [self.diffusion_timesteps], [1]


@dataclass
class FusedParts:
    """Per-image inputs of the fusion: cache (B, K) log-probabilities, token_cos (B, K) CLIP
    cosines, diffusion (B, K) -mean denoising error of the candidates (-inf elsewhere) or None."""

    cache: torch.Tensor
    token_cos: torch.Tensor
    diffusion: torch.Tensor | None = None
    unet_rows: int = 0


@dataclass
class FusedState:
    features: torch.Tensor  # (N, P) L2-normalised CLIP image features of the shots
    labels: torch.Tensor  # (N,) class of each shot
    num_classes: int
    params: FusedParams
    # out-of-fold scores of the shots the weights were fitted on (audit, ablations):
    # "token_cos" (N, K), "diffusion" (N, K); empty without folds
    oof: dict[str, torch.Tensor] = field(default_factory=dict)

    def cache_logp(self, f: torch.Tensor, leave_out: bool = False) -> torch.Tensor:
        """f (B, P) -> (B, K) cache log-probabilities; `leave_out`: f are the shots themselves,
        each scored without its own entry."""
        return cache_logp(
            f, self.features, self.labels, self.num_classes, self.params.beta, leave_out
        )

    def logits(self, f: torch.Tensor, token_cos: torch.Tensor) -> torch.Tensor:
        """f (B, P) image features, token_cos (B, K) -> (B, K) fused logits (softmax = probs)."""
        p = self.params
        out = p.w_cache * self.cache_logp(f)
        if p.w_tokens:
            out = out + p.w_tokens * zscore(token_cos)
        return out

    def candidates(self, cache: torch.Tensor) -> torch.Tensor:
        """(B, K) cache log-probabilities -> (B, m) classes the diffusion part scores."""
        return cache.topk(min(self.params.diffusion_m, self.num_classes), dim=1).indices

    def combine(self, parts: FusedParts) -> torch.Tensor:
        """(B, K) fused logits of precomputed parts (what `Classifier.score` returns)."""
        p = self.params
        out = p.w_cache * parts.cache
        if p.w_tokens:
            out = out + p.w_tokens * zscore(parts.token_cos)
        if p.w_diffusion and parts.diffusion is not None:
            out = out + p.w_diffusion * diffusion_part(
                parts.diffusion, p.diffusion_form, p.diffusion_scale
            )
        return out


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """(B, K) -> each row centred and divided by its std over the classes."""
    scores = scores.float()
    return (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp(min=1e-6)


def cache_logp(
    f: torch.Tensor,
    feats: torch.Tensor,
    labels: torch.Tensor,
    K: int,
    beta: float,
    leave_out: bool = False,
) -> torch.Tensor:
    """(B, K) log-softmax over classes of logmeanexp of beta (cos - 1) over each class's shots.

    A per-class sum of exp over the N shots (index_add), O(B N) memory: a (B, N, K) mask would
    cost 100 GB for the leave-one-out fit at K = 1000 x 5 shots. float64 keeps exp(-2 beta) of
    the farthest shots (beta <= 80) from underflowing to 0 after the shift by the row maximum."""
    aff = beta * (f.double() @ feats.double().T - 1)  # (B, N)
    if leave_out:
        aff = aff.masked_fill(torch.eye(len(f), dtype=torch.bool, device=aff.device), -torch.inf)
    top = aff.max(1, keepdim=True).values.clamp(min=-1e4)  # (B, 1); finite even if all masked
    sums = aff.new_zeros(len(f), K).index_add_(1, labels, (aff - top).exp())
    count = torch.bincount(labels, minlength=K).double().unsqueeze(0)  # (1, K)
    if leave_out:  # each shot's own class has one fewer member
        count = count - torch.nn.functional.one_hot(labels, K).double()  # (N, K)
    lme = sums.log() + top - count.clamp(min=1).log()  # (B, K)
    lme = lme.masked_fill((count == 0) | (sums == 0), -1e4)  # no other shot: far from everything
    return lme.log_softmax(1).float()


def diffusion_part(neg_err: torch.Tensor, form: str, scale: float = 1.0) -> torch.Tensor:
    """(B, K) -mean errors of each image's candidates (-inf elsewhere) -> (B, K) scores on the
    common scale, the best candidate at 0 (global) or z-scored over the candidates (zscore);
    every other class gets the candidates' minimum."""
    cand = torch.isfinite(neg_err)
    x = neg_err.double().masked_fill(~cand, 0)
    n = cand.sum(1, keepdim=True).clamp(min=1)
    if form == "zscore":
        mean = x.sum(1, keepdim=True) / n
        var = ((x - mean) ** 2).masked_fill(~cand, 0).sum(1, keepdim=True) / (n - 1).clamp(min=1)
        x = (x - mean) / var.sqrt().clamp(min=1e-12)
    else:
        best = neg_err.double().masked_fill(~cand, -torch.inf).amax(1, keepdim=True)
        x = (x - best) / scale
    low = x.masked_fill(~cand, torch.inf).amin(1, keepdim=True)
    return torch.where(cand, x, low).float()


def candidate_spread(neg_err: torch.Tensor) -> float:
    """Median over the images of the std of their candidates' errors (the global scale)."""
    cand = torch.isfinite(neg_err)
    stds = [row[c].double().std() for row, c in zip(neg_err, cand, strict=True) if c.sum() > 1]
    return float(torch.stack(stds).median().clamp(min=1e-12)) if stds else 1.0


def _nll(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits, y))


PRIOR = 0.01  # strength of the prior pulling each log-weight above 0 back to 0 (weight 1)


def fit_weights(parts: list[torch.Tensor], y: torch.Tensor) -> list[float]:
    """Positive weights of the score parts (each (N, K)) that minimise the NLL on y, plus a weak
    prior against weights above 1 (a part that separates y perfectly would otherwise run off)."""
    log_w = torch.zeros(len(parts), requires_grad=True)
    opt = torch.optim.LBFGS([log_w], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = sum(w * p for w, p in zip(log_w.exp(), parts, strict=True))
        loss = torch.nn.functional.cross_entropy(z, y) + PRIOR * (log_w.relu() ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return [float(w) for w in log_w.detach().exp()]


def fit_fused(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    token_cos: torch.Tensor | None,
    token_shrink: float = TOKEN_SHRINK,
    diffusion: torch.Tensor | None = None,
    folds: int = 0,
    diffusion_m: int = 3,
    diffusion_timesteps: int = 8,
) -> FusedState:
    """Fit on the shots: features (N, P) L2-normalised, labels (N,), token_cos (N, K) the token
    cosines of the shots (None: cache alone). folds > 0: token_cos and diffusion (N, K), the
    -errors of each shot's candidates (-inf elsewhere; None: no diffusion part), come from
    tokens that did not train on that shot, so no shrink is applied; the diffusion part's form
    (global scale or z-scored) is the one with the lower penalised NLL."""
    features, labels = features.float().cpu(), labels.long().cpu()
    K, y = num_classes, labels
    loo = {b: cache_logp(features, features, labels, K, b, leave_out=True) for b in BETAS}
    beta = min(BETAS, key=lambda b: _nll(loo[b], y))
    cache = loo[beta]
    (w_c,) = fit_weights([cache], y)  # the cache alone, calibrated
    ev = {"cache_loo_acc": _acc(cache, y), "cache_loo_nll": _nll(w_c * cache, y)}
    shrink = 1.0 if folds else token_shrink
    setup = dict(folds=folds, diffusion_m=diffusion_m, diffusion_timesteps=diffusion_timesteps)
    params = FusedParams(beta=beta, w_cache=w_c, token_shrink=shrink, evidence=ev, **setup)
    oof = {}
    if folds and token_cos is not None:
        oof["token_cos"] = token_cos.float().cpu()
    if folds and diffusion is not None:
        oof["diffusion"] = diffusion.float().cpu()
    tok = zscore(token_cos.cpu()) if token_cos is not None and shrink > 0 else None  # (N, K)
    if folds == 0:
        diffusion = None  # in-sample errors would get an optimistic weight: no diffusion part
    if tok is None and diffusion is None:
        return FusedState(features, labels, K, params, oof)
    # one fit per form of the diffusion part (or one without it); the lowest penalised NLL wins
    best = None
    for form in FORMS if diffusion is not None else (None,):
        parts = [cache] + ([tok] if tok is not None else [])
        scale = candidate_spread(diffusion) if form == "global" else 1.0
        if form is not None:
            parts.append(diffusion_part(diffusion, form, scale))
        w = fit_weights(parts, y)
        z = sum(wi * pi for wi, pi in zip(w, parts, strict=True))
        loss = _nll(z, y) + PRIOR * sum(max(math.log(wi), 0) ** 2 for wi in w)
        if best is None or loss < best[0]:
            best = (loss, form, scale, w, parts)
    _, form, scale, w, parts = best
    w_t = w[1] * shrink if tok is not None else 0.0
    w_d = w[-1] if form is not None else 0.0
    z = w[0] * cache + (w_t * tok if tok is not None else 0) + (w_d * parts[-1] if w_d else 0)
    key = "oof" if folds else "shot"  # shot: optimistic, the tokens were trained on these shots
    if tok is not None:
        ev[f"tokens_{key}_acc"] = _acc(tok, y)
    if form is not None:
        ev["diffusion_oof_acc"] = _acc(parts[-1], y)  # among the cache's top m
    ev.update(fused_loo_acc=_acc(z, y), fused_loo_nll=_nll(z, y))
    params = FusedParams(
        beta, w[0], w_t, shrink, ev, w_d, diffusion_form=form or "global",
        diffusion_scale=scale, **setup,
    )  # fmt: skip
    return FusedState(features, labels, K, params, oof)


@torch.no_grad()
def fit_for_tokens(
    bundle: ModelBundle,
    tokens: TokenSet,
    table: TokenTable,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    template: str = TEMPLATES[0],
    token_shrink: float = TOKEN_SHRINK,
) -> FusedState:
    """The fused state of a trained token set from its shots: pixels (N, 3, H, W), labels (N,)
    (no folds: the token weight is fitted on the tokens' own shots and shrunk)."""
    feats = bundle.clip_image_features_cpu(pixels)  # (N, P)
    K = tokens.num_classes
    text = tokens.clip_text_features(table, [tokens.prompt(k, template) for k in range(K)])
    return fit_fused(feats, labels, K, feats @ text.float().cpu().T, token_shrink)


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def save_fused(out: str | Path, state: FusedState) -> None:
    """TOKENS/fused.safetensors then TOKENS/fused.json (the JSON marks a complete state)."""
    out = Path(out)
    tensors = {"features": state.features, "labels": state.labels}
    tensors.update({f"oof_{k}": v.contiguous() for k, v in state.oof.items()})
    atomic_save_safetensors(out / FUSED_TENSORS, tensors)
    meta = {"format": FORMAT, "num_classes": state.num_classes, **asdict(state.params)}
    atomic_write_json(out / FUSED_JSON, meta)


def has_fused(path: str | Path) -> bool:
    return (Path(path) / FUSED_JSON).is_file()


def load_fused(path: str | Path, num_classes: int) -> FusedState:
    """The fused state of a token directory; a missing or corrupt one is a UserError."""
    path = Path(path)
    if not has_fused(path) or not (path / FUSED_TENSORS).is_file():
        raise UserError(
            f"'{path}' has no fused scorer state ({FUSED_JSON}, {FUSED_TENSORS}): train the "
            "tokens with a model that has a CLIP vision tower, or pick --scorer diffusion/clip/hybrid"
        )
    try:
        meta = json.loads((path / FUSED_JSON).read_bytes())
        sd = load_file(str(path / FUSED_TENSORS))
        feats, labels = sd["features"].float(), sd["labels"].long()
        fields = {k: meta[k] for k in REQUIRED}  # the others: defaults (states before folds)
        fields.update({k: meta[k] for k in FusedParams.__dataclass_fields__ if k in meta})
        params = FusedParams(**fields)
        oof = {k[4:]: v.float() for k, v in sd.items() if k.startswith("oof_")}
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as e:
        raise UserError(f"fused scorer state in '{path}' is corrupt: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"fused scorer state in '{path}' is corrupt: missing {e}") from e
    ok = (
        meta.get("format") == FORMAT
        and meta.get("num_classes") == num_classes
        and feats.ndim == 2
        and labels.shape == (len(feats),)
        and len(labels) > 0
        and int(labels.min()) >= 0
        and int(labels.max()) < num_classes
        and all(
            math.isfinite(float(x))
            for x in (params.beta, params.w_cache, params.w_tokens, params.w_diffusion)
        )
        and params.diffusion_form in FORMS
        and all(v.shape == (len(feats), num_classes) for v in oof.values())
    )
    if not ok:
        raise UserError(
            f"fused scorer state in '{path}' does not match its token set ({num_classes} classes)"
        )
    return FusedState(feats, labels, num_classes, params, oof)


def edited_fused(parts: list[tuple[FusedState, list[str]]], labels: list[str]) -> FusedState:
    """The fused state of an edited token set (`mcti tokens merge|remove|rename`), without the
    model: the cache rows of each part (a state and its classes' labels, renamed) whose label
    is in `labels`, renumbered to `labels`. One part keeps its fitted numbers; several get their
    mean weighted by classes (a refit needs the tokens' CLIP scores, so the model: `mcti train`
    and `--extend` refit). The out-of-fold audit scores are not carried."""
    feats, ys, params = [], [], []
    for state, names in parts:
        index = torch.tensor([labels.index(x) if x in labels else -1 for x in names])
        y = index[state.labels]
        feats.append(state.features[y >= 0])
        ys.append(y[y >= 0])
        params.append((state.params, len(names)))
    if len(parts) == 1:
        fitted = params[0][0]
    else:
        w = torch.tensor([n for _, n in params], dtype=torch.float64)
        w = w / w.sum()

        def mean(key: str) -> float:
            return float(sum(wi * getattr(p, key) for wi, (p, _) in zip(w, params, strict=True)))

        numbers = ("beta", "w_cache", "w_tokens", "token_shrink", "w_diffusion")
        fitted = replace(  # the diffusion part's grid and form: the first set's
            params[0][0],
            **{k: mean(k) for k in numbers},
            evidence={"merged": [p.evidence for p, _ in params]},
        )
    return FusedState(torch.cat(feats), torch.cat(ys), len(labels), fitted)
