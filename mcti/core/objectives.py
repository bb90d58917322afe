"""Training objectives: TI (noise-prediction loss) and the MC-TI discriminative terms.

loss = alpha * TI + gamma * CE(logits, y), where the logits come from
- `denoise`: per-class errors of the same image under shared (t, eps) draws (the t-dependent
  part of the error cancels in the softmax because every class sees the same draw), several
  draws per image averaged: logits = -mean_d err / tau. Optionally standardised across the
  candidates per (image, draw) first (`standardize`; it amplified noise in our measurements);
- `clip`: 10 * cos(CLIP text feature of the class prompt, CLIP image embedding of each candidate
  class): the image itself for its own class, a random shot (or the prototype) for negatives.
Randomness is drawn for the *global* batch by `sample_draws`, so data-parallel ranks that take
slices of it (`shard_draws`) compute exactly what one process would.
"""

import torch
from torch import nn

from mcti.core.diffusion import noised, row_errors
from mcti.core.model import ModelBundle
from mcti.core.tokens import TEMPLATES, TokenSet, TokenTable
from mcti.settings import ObjectiveSettings  # the schema's group: method, reg, tau, ...

__all__ = [
    "ALL_TEXTS_MAX",
    "Objective",
    "ObjectiveSettings",
    "ScorerDecision",
    "sample_draws",
    "sample_negatives",
    "shard_draws",
]

# Up to this many classes, ScorerDecision scores every image against all K texts (one text
# encoder pass over K prompts per step); above, against its class and its --negatives only.
ALL_TEXTS_MAX = 256


def sample_negatives(
    labels: torch.Tensor,
    num_classes: int,
    m: int,
    gen: torch.Generator,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) labels -> (B, m) distinct classes != label: uniform, or by `weights` (K, K) rows."""
    m = min(m, num_classes - 1)
    out = torch.empty(len(labels), m, dtype=torch.long)
    for b, y in enumerate(labels.tolist()):
        if weights is None:
            pick = torch.randperm(num_classes - 1, generator=gen)[:m]
            out[b] = pick + (pick >= y).long()  # skip the true class
        else:
            w = weights[y].clone().float().clamp(min=0) + 1e-12
            w[y] = 0
            out[b] = torch.multinomial(w, m, replacement=False, generator=gen)
    return out


def sample_draws(
    s: ObjectiveSettings,
    labels: torch.Tensor,
    num_classes: int,
    latent_shape: tuple[int, ...],
    num_train_timesteps: int,
    gen: torch.Generator,
    hard_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All randomness of one step for a global batch of B images (CPU tensors, dim 0 = B)."""
    B, T = len(labels), num_train_timesteps
    d = dict(
        template=torch.randint(len(TEMPLATES), (B,), generator=gen),
        flip=torch.rand(B, generator=gen) < s.flip,
        t=torch.randint(T, (B,), generator=gen),
        eps=torch.randn(B, *latent_shape, generator=gen),
    )
    if s.method == "mcti":
        M = s.negatives
        d["negatives"] = sample_negatives(labels, num_classes, M, gen, hard_weights)
        if s.reg == "denoise":
            lo, hi = int(s.disc_t_min * T), max(int(s.disc_t_max * T), int(s.disc_t_min * T) + 1)
            d["disc_t"] = torch.randint(lo, hi, (B, s.draws), generator=gen)
            d["disc_eps"] = torch.randn(B, s.draws, *latent_shape, generator=gen)
        else:
            # any shot of each negative class: reduced modulo that class's shot count at use
            d["shot"] = torch.randint(1 << 30, (B, d["negatives"].shape[1]), generator=gen)
    return d


def shard_draws(draws: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank's contiguous slice of a global batch's draws."""
    B = len(draws["t"])
    n = B // world
    return {k: v[rank * n : (rank + 1) * n] for k, v in draws.items()}


class Objective:
    """Computes the loss of one (local) batch for a TokenTable; drives plain or DeepSpeed loops."""

    def __init__(
        self,
        bundle: ModelBundle,
        tokens: TokenSet,
        settings: ObjectiveSettings,
        class_embeds: torch.Tensor | None = None,
        class_counts: torch.Tensor | None = None,
    ):
        self.bundle, self.tokens, self.s = bundle, tokens, settings
        # clip reg: (K, S, P) shot embeddings per class, counts (K,)
        self.class_embeds, self.class_counts = class_embeds, class_counts
        if settings.method == "mcti" and settings.reg == "clip":
            bundle.require_clip()
            if class_embeds is None:
                raise ValueError("clip regularizer needs the shots' CLIP image embeddings")

    def loss(
        self,
        table: TokenTable,
        x0: torch.Tensor,
        labels: torch.Tensor,
        draws: dict[str, torch.Tensor],
        image_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """x0 (B, C, H, W) clean latents (flips applied), labels (B,) -> scalar loss, metrics."""
        s, dev = self.s, self.bundle.device
        B = len(labels)
        labels = labels.to(dev)
        cands = labels.view(B, 1)  # (B, C) candidate classes, true class first
        if "negatives" in draws:
            cands = torch.cat([cands, draws["negatives"].to(dev)], dim=1)
        C = cands.shape[1]
        # the clip term reads the true class's prompt alone (its negatives are images): encode
        # only that one, else the text encoder's work grows with --negatives for nothing
        E = 1 if s.method == "mcti" and s.reg == "clip" else C  # prompts encoded per image
        templates = [TEMPLATES[i] for i in draws["template"].tolist()]
        prompts = [
            self.tokens.prompt(k, templates[b]) for b in range(B) for k in cands[b, :E].tolist()
        ]
        hidden, pooled = self.tokens.encode(table, prompts)  # (B*E, L, d), (B*E, d)

        # TI term: each image under its own class, uniform t.
        x_t, target = noised(self.bundle, x0, draws["t"].to(dev), draws["eps"].to(dev))
        rows = torch.arange(B, device=dev)
        ti = row_errors(self.bundle, x_t, draws["t"].to(dev), target, rows, hidden[rows * E]).mean()
        metrics = {"ti": ti.item()}
        loss = s.alpha * ti
        if s.method != "mcti":
            metrics["loss"] = loss.item()
            return loss, metrics

        if s.reg == "denoise":
            logits = self._denoise_logits(x0, hidden, draws, B, C)
        else:
            logits = self._clip_logits(pooled.view(B, E, -1)[:, 0], cands, draws, image_embeds)
        target_idx = torch.zeros(B, dtype=torch.long, device=dev)
        ce = nn.functional.cross_entropy(logits, target_idx)
        loss = loss + s.gamma * ce
        metrics.update(
            ce=ce.item(),
            disc_acc=(logits.argmax(1) == 0).float().mean().item(),
            loss=loss.item(),
        )
        return loss, metrics

    def _denoise_logits(self, x0, hidden, draws, B: int, C: int) -> torch.Tensor:
        dev = x0.device
        D = draws["disc_t"].shape[1]
        t = draws["disc_t"].to(dev).reshape(B * D)  # pairs p = b * D + d
        x_t, target = noised(
            self.bundle, x0.repeat_interleave(D, 0), t, draws["disc_eps"].to(dev).flatten(0, 1)
        )
        b = torch.arange(B, device=dev).view(B, 1, 1)
        d = torch.arange(D, device=dev).view(1, D, 1)
        c = torch.arange(C, device=dev).view(1, 1, C)
        pair = (b * D + d).expand(B, D, C).reshape(-1)  # rows (b, d, c)
        cond = hidden[(b * C + c).expand(B, D, C).reshape(-1)]
        err = row_errors(self.bundle, x_t, t, target, pair, cond).view(B, D, C)
        if self.s.standardize:
            mean = err.mean(2, keepdim=True)
            var = err.var(2, keepdim=True, unbiased=False)
            err = (err - mean) / (var + (self.s.std_floor * mean) ** 2).sqrt()
        return -err.mean(1) / self.s.tau  # (B, C)

    def _clip_logits(self, text_pooled, cands, draws, image_embeds) -> torch.Tensor:
        clip = self.bundle.require_clip()
        text = nn.functional.normalize(clip.text_projection(text_pooled), dim=-1)  # (B, P)
        embeds = self.class_embeds.to(text.device)  # (K, S, P)
        negs = cands[:, 1:]
        if self.s.prototype:
            protos = nn.functional.normalize(
                embeds.sum(1) / self.class_counts.to(text.device).view(-1, 1), dim=-1
            )
            neg_emb = protos[negs]  # (B, M, P)
        else:
            neg_emb = embeds[
                negs, draws["shot"].to(text.device) % self.class_counts.to(text.device)[negs]
            ]
        own = image_embeds.to(text.device).unsqueeze(1)  # (B, 1, P)
        img = torch.cat([own, neg_emb], dim=1)  # (B, C, P)
        return 10 * torch.einsum("bp,bcp->bc", text, img)


class ScorerDecision:
    """--reg clip's image->text part: the clip scorer's decision, trained. Each image must pick
    its class's text (scorer's prompt, TEMPLATES[0]) among the candidate texts: all K while
    K <= `all_texts_max`, else its class and its sampled (or hard) negatives, so a shard of a
    global batch computes what one process would. Cross-entropy over 10 * cos, as the scorer's
    logits. Gradient reaches the trainable classes' rows only: a frozen class's text (an
    extension's old set, `trainable` False) is computed once, without gradient."""

    def __init__(
        self,
        tokens: TokenSet,
        trainable: torch.Tensor | None = None,
        all_texts_max: int = ALL_TEXTS_MAX,
    ):
        K = tokens.num_classes
        self.tokens, self.all_texts_max = tokens, all_texts_max
        trainable = torch.ones(K, dtype=torch.bool) if trainable is None else trainable.cpu()
        self.trained = trainable.nonzero().flatten()  # (T,) class indices
        self.frozen = (~trainable).nonzero().flatten()  # (F,)
        self.is_trained = trainable
        self.frozen_texts: torch.Tensor | None = None  # (F, P) unit CLIP text features

    def candidates(
        self, labels: torch.Tensor, negatives: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) candidate classes of each image and (B,) the column of its own class."""
        K, B = self.tokens.num_classes, len(labels)
        if K <= self.all_texts_max or negatives is None:
            return torch.arange(K).expand(B, K), labels
        return torch.cat([labels.view(B, 1), negatives], 1), torch.zeros(B, dtype=torch.long)

    def texts(self, table, classes: torch.Tensor) -> torch.Tensor:
        """(U,) distinct classes -> (U, P) unit text features (trainable ones differentiable)."""
        if self.frozen_texts is None and len(self.frozen):
            with torch.no_grad():
                prompts = [self.tokens.prompt(k) for k in self.frozen.tolist()]
                self.frozen_texts = self.tokens.clip_text_features(table, prompts).float()
        new = self.is_trained[classes].nonzero().flatten()  # rows of trainable classes
        old = (~self.is_trained[classes]).nonzero().flatten()
        fresh = None  # (U_T, P); none when every candidate is frozen (an extension, K large)
        if len(new):
            prompts = [self.tokens.prompt(k) for k in classes[new].tolist()]
            fresh = self.tokens.clip_text_features(table, prompts).float()
        like = fresh if fresh is not None else self.frozen_texts
        out = torch.zeros(len(classes), like.shape[1], device=like.device)
        if fresh is not None:
            out = out.index_copy(0, new.to(out.device), fresh)
        if len(old):  # row of each frozen class in frozen_texts
            at = torch.searchsorted(self.frozen, classes[old])
            out = out.index_copy(0, old.to(out.device), self.frozen_texts[at.to(out.device)])
        return out

    def loss(
        self,
        table,
        image_embeds: torch.Tensor,
        labels: torch.Tensor,
        negatives: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, float]:
        """image_embeds (B, P) unit, labels (B,), negatives (B, M) -> mean CE, decision acc."""
        cands, target = self.candidates(
            labels.cpu(), None if negatives is None else negatives.cpu()
        )
        classes, where = torch.unique(cands, return_inverse=True)  # (U,), (B, C)
        text = self.texts(table, classes)  # (U, P)
        img = image_embeds.to(text.device).float()  # (B, P)
        logits = 10 * (img @ text.T).gather(1, where.to(text.device))  # (B, C)
        target = target.to(text.device)
        ce = nn.functional.cross_entropy(logits, target)
        return ce, (logits.argmax(1) == target).float().mean().item()
