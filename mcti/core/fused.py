"""The fused scorer's state: a few-shot cache of the shots' CLIP image features, fused with the
class tokens' CLIP text scores, weighted by evidence from the shots, calibrated.

Per image, each component becomes class log-probabilities (the common scale):
- cache (semantic-agnostic Tip-Adapter): affinity exp(-beta (1 - f . F_i)) to each shot i,
  averaged per class, log-normalised: `log_softmax(logmeanexp_{i in c} beta (f . F_i - 1))`;
- tokens: the clip scorer's cosines cos(f, text_c), z-scored over the classes of each image
  (their raw spread is tiny and varies per token set; softmax ignores the per-image shift).
Fused logits are `w_cache * cache + w_tokens * tokens`, and `softmax` of them is the calibrated
output: the weights carry the temperature.

Fit, on the training shots alone: beta by the cache's leave-one-out log-likelihood (honest: a
shot never sees itself); both weights by the log-likelihood of the fused leave-one-out logits,
with a weak prior against weights above 1 (tokens often separate their own shots perfectly, where the
likelihood alone would send their weight to infinity). The tokens were trained on these shots,
so their shot scores are optimistic; `token_shrink` multiplies the fitted token weight to pay
for that (0: cache alone).
State: TOKENS/fused.safetensors (features, labels) + TOKENS/fused.json (the fitted numbers).
"""

import json
import math
from dataclasses import asdict, dataclass, field
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
TOKEN_SHRINK = 0.5  # fitted token weight kept; chosen a priori, see benchmarks/RESULTS.md


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
    """Factor applied to the fitted token weight (tokens' shot scores are optimistic)."""
    evidence: dict = field(default_factory=dict)
    """Leave-one-out accuracy and NLL on the shots of each component and of the fusion."""


@dataclass
class FusedState:
    features: torch.Tensor  # (N, P) L2-normalised CLIP image features of the shots
    labels: torch.Tensor  # (N,) class of each shot
    num_classes: int
    params: FusedParams

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
    The per-class reductions scatter the (B, N) affinities into (B, K): never a (B, N, K)
    tensor, which at K = 1000 and 5 shots (B = N = 5000 leaving one out) is 100 GB."""
    aff = beta * (f.float() @ feats.float().T - 1)  # (B, N)
    if leave_out:
        aff = aff.masked_fill(torch.eye(len(f), dtype=torch.bool), -torch.inf)
    index = labels.view(1, -1).expand_as(aff)  # (B, N) class of each shot
    top = torch.full((len(aff), K), -torch.inf).scatter_reduce(1, index, aff, "amax")  # (B, K)
    top = torch.where(top.isfinite(), top, torch.zeros_like(top))  # empty class: no shift
    total = torch.zeros_like(top).scatter_add(1, index, (aff - top.gather(1, index)).exp())
    count = torch.bincount(labels, minlength=K).float().unsqueeze(0)  # (1, K)
    if leave_out:  # each shot's own class has one fewer member
        count = count - torch.nn.functional.one_hot(labels, K).float()  # (N, K)
    lme = total.log() + top - count.clamp(min=1).log()  # (B, K)
    lme = lme.masked_fill(count == 0, -1e4)  # a class with no other shot: far from everything
    return lme.log_softmax(1)


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
) -> FusedState:
    """Fit on the shots: features (N, P) L2-normalised, labels (N,), token_cos (N, K) the token
    cosines of the shots (None: cache alone)."""
    features, labels = features.float().cpu(), labels.long().cpu()
    K, y = num_classes, labels
    loo = {b: cache_logp(features, features, labels, K, b, leave_out=True) for b in BETAS}
    beta = min(BETAS, key=lambda b: _nll(loo[b], y))
    cache = loo[beta]
    (w_c,) = fit_weights([cache], y)  # the cache alone, calibrated
    ev = {"cache_loo_acc": _acc(cache, y), "cache_loo_nll": _nll(w_c * cache, y)}
    params = FusedParams(beta=beta, w_cache=w_c, token_shrink=token_shrink, evidence=ev)
    if token_cos is not None and token_shrink > 0:
        tok = zscore(token_cos.cpu())  # (N, K)
        w_c, w_t = fit_weights([cache, tok], y)
        w_t *= token_shrink
        z = w_c * cache + w_t * tok
        ev.update(
            tokens_shot_acc=_acc(tok, y),  # optimistic: the tokens were trained on these shots
            fused_loo_acc=_acc(z, y),
            fused_loo_nll=_nll(z, y),
        )
        params = FusedParams(beta, w_c, w_t, token_shrink, ev)
    return FusedState(features, labels, K, params)


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
    """The fused state of a trained token set from its shots: pixels (N, 3, H, W), labels (N,)."""
    feats = (
        torch.cat(
            [bundle.clip_image_features(pixels[i : i + 64]) for i in range(0, len(pixels), 64)]
        )
        .float()
        .cpu()
    )  # (N, P)
    K = tokens.num_classes
    text = tokens.clip_text_features(table, [tokens.prompt(k, template) for k in range(K)])
    return fit_fused(feats, labels, K, feats @ text.float().cpu().T, token_shrink)


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def save_fused(out: str | Path, state: FusedState) -> None:
    """TOKENS/fused.safetensors then TOKENS/fused.json (the JSON marks a complete state)."""
    out = Path(out)
    atomic_save_safetensors(
        out / FUSED_TENSORS, {"features": state.features, "labels": state.labels}
    )
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
        fields = {k: meta[k] for k in FusedParams.__dataclass_fields__}
        params = FusedParams(**fields)
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
        and all(math.isfinite(float(x)) for x in (params.beta, params.w_cache, params.w_tokens))
    )
    if not ok:
        raise UserError(
            f"fused scorer state in '{path}' does not match its token set ({num_classes} classes)"
        )
    return FusedState(feats, labels, num_classes, params)
