"""Scorers: images -> per-class scores (higher is better) and a ranking.

`diffusion` (Diffusion Classifier, Li et al. 2023): per image, a grid of (t, eps) pairs shared
by all classes; class error = mean ||target - pred(x_t, t, c)||^2 over the pairs it was scored
on; adaptive elimination in stages. Rows (image, class, t) of several images go through the UNet
together, up to `batch_rows` per pass; class conditioning is computed once per token set.
Fewer rows (optional): a significance rule drops, after each chunk of timesteps, every class
whose paired per-t error differences to the leader make it significantly worse (one-sided Student
t bound, Bonferroni over the classes), so easy images stop early; and the grid can be drawn from a
per-model timestep density (`grid_from_weights`, measured by `diffusion.separation_by_t`).
With more than `prefilter_m` classes the diffusion scorer first keeps
the clip top `prefilter_m` (as hybrid does), so its UNet rows per image stay flat in K.
`clip`: cosine of CLIP image and class-prompt text embeddings. `hybrid`: clip top-m, then
diffusion among those. `fused`: the clip scorer's token cosines fused with a cache of the shots'
image features and (token sets trained with --fit-folds) the tokens' denoising errors of the
cache's top m classes, weighted and calibrated on the shots (mcti.core.fused); it gives `probs`.

Over 400 lines: the three scorers and the one Classifier entry point read best side by side.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mcti.core.diffusion import noised, row_errors
from mcti.core.fused import FusedParams, FusedParts, FusedState
from mcti.core.model import ModelBundle
from mcti.core.tokens import TEMPLATES, TokenSet, TokenTable
from mcti.errors import UserError

if TYPE_CHECKING:  # the scorer part of `mcti.settings` (hybrid_m, n_samples, to_keep, ...)
    from mcti.settings import ScorerSettings


@dataclass
class Scores:
    """scores (B, K): -mean error (diffusion) or cosine (clip), higher is better; -inf where a
    class was never scored. stage (B, K): how far each class got in elimination (survivors
    highest); ranking is by stage, then score. probs (B, K): calibrated class probabilities,
    from the scorers that have a fitted temperature (fused), else None."""

    scores: torch.Tensor
    stage: torch.Tensor
    unet_rows: int = 0
    probs: torch.Tensor | None = None

    def ranking(self) -> torch.Tensor:
        """(B, K) class indices, best first."""
        by_score = self.scores.argsort(dim=1, descending=True, stable=True)
        by_stage = self.stage.gather(1, by_score).argsort(dim=1, descending=True, stable=True)
        return by_score.gather(1, by_stage)

    def topk(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, k) class indices best first, and their scores."""
        idx = self.ranking()[:, : min(k, self.scores.shape[1])]
        return idx, self.scores.gather(1, idx)


def parse_schedule(
    n_samples: str | list[int], to_keep: str | list[int], num_classes: int
) -> tuple[list[int], list[int]]:
    """Validate an elimination schedule; `to_keep` is clipped to the number of classes."""
    try:
        ns = (
            [int(x) for x in n_samples.split(",")]
            if isinstance(n_samples, str)
            else list(n_samples)
        )
        tk = [int(x) for x in to_keep.split(",")] if isinstance(to_keep, str) else list(to_keep)
    except ValueError as e:
        raise UserError(f"--n-samples/--to-keep must be comma-separated integers ({e})") from e
    if len(ns) != len(tk) or not ns:
        raise UserError(f"--n-samples has {len(ns)} stages but --to-keep has {len(tk)}")
    if any(n < 1 for n in ns) or any(b <= a for a, b in zip(ns, ns[1:], strict=False)):
        raise UserError(f"--n-samples must be positive and increasing, got {ns}")
    if tk[-1] != 1 or any(b > a for a, b in zip(tk, tk[1:], strict=False)) or min(tk) < 1:
        raise UserError(f"--to-keep must be non-increasing and end with 1, got {tk}")
    return ns, [min(k, num_classes) for k in tk]


def timestep_grid(n: int, num_train_timesteps: int) -> list[int]:
    """n evenly spaced timesteps (the Diffusion Classifier's `range(start, T, T // n)`)."""
    T = num_train_timesteps
    n = min(n, T)
    return list(range(T // n // 2, T, T // n))[:n]


def grid_from_weights(weights: torch.Tensor, n: int, num_train_timesteps: int) -> list[int]:
    """n timesteps (ascending) placed at the quantiles (j + 0.5) / n of a piecewise-constant
    density over len(weights) equal bins of [0, T): bins of weight 0 get no timestep, so the
    grid covers the band where the classes separate. Equal weights give an even grid."""
    w = weights.double().clamp(min=0)
    if not (w.sum() > 0):
        raise UserError("the timestep weights are all zero: no timestep separates the classes")
    T, bins = num_train_timesteps, len(w)
    cdf = torch.cat([torch.zeros(1, dtype=w.dtype), (w / w.sum()).cumsum(0)])  # (bins + 1,)
    out = []
    for j in range(n):
        u = (j + 0.5) / n
        b = min(
            int(torch.searchsorted(cdf, torch.tensor(u, dtype=w.dtype), right=True)) - 1, bins - 1
        )
        within = (u - cdf[b].item()) / max((cdf[b + 1] - cdf[b]).item(), 1e-12)
        out.append(min(int((b + within) * T / bins), T - 1))
    return out


def spread_order(n: int) -> list[int]:
    """0..n-1 in bit-reversed order, so every prefix spreads over the whole range (the chunks
    of timesteps an early-stopped image sees cover low and high t alike)."""
    bits = max(1, math.ceil(math.log2(max(n, 2))))
    out, seen = [], set()
    for i in range(1 << bits):
        p = int(format(i, f"0{bits}b")[::-1], 2) * n >> bits
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def significantly_worse(
    errs: torch.Tensor, alive: torch.Tensor, level: float, min_draws: int = 4
) -> torch.Tensor:
    """errs (B, K, n): per-t errors on the n timesteps every alive class was scored on (the
    same (t, eps) draws, so differences are paired); alive (B, K) bool. Returns (B, K) bool:
    alive classes whose mean paired difference to the image's leader (lowest mean error) has a
    one-sided (1 - level / (m - 1)) Student t lower bound above 0, m = alive classes. Ties and
    n < min_draws are never significant."""
    B, K, n = errs.shape
    if n < max(min_draws, 2):
        return torch.zeros_like(alive)
    mean = torch.where(alive, errs.mean(2), torch.inf)  # (B, K)
    lead = mean.argmin(1)  # (B,)
    d = errs - errs[torch.arange(B), lead].unsqueeze(1)  # (B, K, n) paired differences
    m = alive.sum(1, keepdim=True).clamp(min=2)  # (B, 1)
    from scipy.stats import t as student_t  # only with --stop-level > 0

    crit = torch.tensor(student_t.ppf(1 - level / (m - 1).double().numpy(), n - 1))  # (B, 1)
    bound = d.mean(2) - crit.to(d) * d.std(2) / math.sqrt(n)  # (B, K)
    return alive & (bound > 0)


class DiffusionScorer:
    def __init__(
        self,
        bundle: ModelBundle,
        tokens: TokenSet,
        table: TokenTable,
        n_samples: str | list[int] = "8,16,32",
        to_keep: str | list[int] = "5,2,1",
        batch_rows: int = 256,
        template: str = TEMPLATES[0],
        seed: int = 0,
        stop_level: float = 0.0,
        t_weights: torch.Tensor | None = None,
    ):
        schedule = parse_schedule(n_samples, to_keep, tokens.num_classes)
        cond = tokens.class_conditioning(table, template)  # (K, L, d), once per token set
        self._build(bundle, cond, schedule, batch_rows, seed, stop_level, t_weights)

    @classmethod
    def from_conditioning(
        cls,
        bundle: ModelBundle,
        cond: torch.Tensor,
        schedule: tuple[list[int], list[int]],
        batch_rows: int = 256,
        seed: int = 0,
        stop_level: float = 0.0,
        t_weights: torch.Tensor | None = None,
    ) -> "DiffusionScorer":
        """A scorer over precomputed class conditioning `cond` (K, L, d) and a schedule that
        `parse_schedule` returned. stop_level > 0 turns on the significance rule at that level;
        t_weights (bins,) draws the grid from that timestep density instead of evenly."""
        scorer = cls.__new__(cls)
        scorer._build(bundle, cond, schedule, batch_rows, seed, stop_level, t_weights)
        return scorer

    @classmethod
    def for_fused(
        cls,
        bundle: ModelBundle,
        cond: torch.Tensor,
        params: FusedParams,
        batch_rows: int = 256,
        seed: int = 0,
    ) -> "DiffusionScorer":
        """The fused scorer's diffusion part: one stage of `params.diffusion_timesteps` (t, eps)
        pairs drawn from `params.diffusion_bands`, run on the candidates given to score_latents."""
        bands = torch.tensor(params.diffusion_bands, dtype=torch.float64)
        return cls.from_conditioning(
            bundle, cond, params.diffusion_schedule(), batch_rows, seed, t_weights=bands
        )

    check_every = 8  # timesteps per chunk between two significance checks

    def _build(
        self,
        bundle: ModelBundle,
        cond: torch.Tensor,
        schedule: tuple[list[int], list[int]],
        batch_rows: int,
        seed: int,
        stop_level: float = 0.0,
        t_weights: torch.Tensor | None = None,
    ) -> None:
        if batch_rows < 1:
            raise UserError("--batch-rows must be >= 1")
        if not 0 <= stop_level < 1:
            raise UserError(f"--stop-level must be in [0, 1), not {stop_level}")
        self.bundle, self.batch_rows, self.seed = bundle, batch_rows, seed
        self.stop_level = stop_level
        self.cond, self.K = cond, len(cond)  # (K, L, d)
        self.n_samples, self.to_keep = schedule
        # One grid of the largest stage's size; each stage takes an evenly spaced subset of it
        # (cumulative), exactly like the reference implementation.
        T, N = bundle.num_train_timesteps, self.n_samples[-1]
        grid = timestep_grid(N, T) if t_weights is None else grid_from_weights(t_weights, N, T)
        self.grid = torch.tensor(grid)  # (N,)
        self.stage_ids = [self._stage_ids(n) for n in self.n_samples]

    def _stage_ids(self, n: int) -> list[int]:
        """Grid indices of a stage with n samples: the reference's `grid[N//n//2::N//n][:n]`."""
        N = len(self.grid)
        return list(range(N))[N // n // 2 :: N // n][:n]

    @torch.no_grad()
    def score_latents(self, x0: torch.Tensor, candidates: torch.Tensor | None = None) -> Scores:
        """x0 (B, C, h, w) -> Scores over all K classes. `candidates` (B, m) restricts the classes."""
        B, dev, N = len(x0), x0.device, len(self.grid)
        gen = torch.Generator().manual_seed(self.seed)
        eps = torch.randn(N, *x0.shape[1:], generator=gen).to(dev)  # shared by all images/classes
        t = self.grid.to(dev)
        # pairs p = b * N + j
        x_t, target = noised(
            self.bundle, x0.repeat_interleave(N, 0), t.repeat(B), eps.repeat(B, 1, 1, 1)
        )
        errs_t = torch.full((B, self.K, N), torch.nan, device=dev)  # per-t errors, NaN: not run
        alive = torch.ones(B, self.K, dtype=torch.bool, device=dev)
        if candidates is not None:
            alive = torch.zeros_like(alive).scatter_(1, candidates.to(dev), True)
        stage = torch.zeros(B, self.K, dtype=torch.long, device=dev)
        done: list[int] = []  # grid indices run so far, in order
        rows_run = 0
        for s, (ids, keep) in enumerate(zip(self.stage_ids, self.to_keep, strict=True)):
            new = sorted(set(ids) - set(done))
            # without the rule a stage runs in one chunk (the reference's order); with it, in
            # chunks of spread timesteps with a significance check after each
            chunks = [new]
            if self.stop_level > 0 and new:
                new = [new[i] for i in spread_order(len(new))]
                chunks = [
                    new[i : i + self.check_every] for i in range(0, len(new), self.check_every)
                ]
            stage[alive] = s + 1
            for chunk in chunks:
                racing = alive & (alive.sum(1, keepdim=True) > 1) if self.stop_level > 0 else alive
                rows_run += self._run(x_t, t, target, errs_t, racing, chunk)
                done += chunk
                if self.stop_level > 0:
                    alive &= ~significantly_worse(errs_t[:, :, done], racing, self.stop_level)
            mean = torch.where(alive, errs_t[:, :, done].nanmean(2), torch.inf)
            kth = mean.topk(min(keep, self.K), dim=1, largest=False).indices
            alive = torch.zeros_like(alive).scatter_(1, kth, True) & alive
        stage[alive] = len(self.stage_ids) + 1  # the final survivor(s)
        scores = -errs_t.nanmean(2).nan_to_num(torch.inf)  # (B, K), -inf where never scored
        return Scores(scores.cpu(), stage.cpu(), rows_run)

    def _run(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        target: torch.Tensor,
        errs_t: torch.Tensor,
        alive: torch.Tensor,
        ids: list[int],
    ) -> int:
        """Score the alive (image, class) pairs on grid indices `ids` into errs_t (B, K, N);
        returns the UNet rows run. x_t, target (B * N, C, h, w), t (N,)."""
        B, _, N = errs_t.shape
        b, c = alive.nonzero(as_tuple=True)  # (A,) alive (image, class) pairs
        if not len(ids) or not len(b):
            return 0
        new = torch.tensor(ids, dtype=torch.long, device=errs_t.device)
        # rows (alive pair, new t): pair index into x_t, class for conditioning
        pair = (b.view(-1, 1) * N + new.view(1, -1)).reshape(-1)
        cls = c.view(-1, 1).expand(-1, len(new)).reshape(-1)
        errs = torch.cat(
            [
                row_errors(
                    self.bundle,
                    x_t,
                    t.repeat(B),
                    target,
                    pair[i : i + self.batch_rows],
                    self.cond[cls[i : i + self.batch_rows]],
                )
                for i in range(0, len(pair), self.batch_rows)
            ]
        ).view(len(b), len(new))
        errs_t[b.view(-1, 1), c.view(-1, 1), new.view(1, -1)] = errs
        return len(pair)


class ClipScorer:
    def __init__(
        self,
        bundle: ModelBundle,
        tokens: TokenSet,
        table: TokenTable,
        template: str = TEMPLATES[0],
    ):
        with torch.no_grad():
            text = tokens.clip_text_features(
                table, [tokens.prompt(k, template) for k in range(tokens.num_classes)]
            )  # (K, P)
        self.bundle, self.text = bundle, text

    @classmethod
    def from_text_features(cls, bundle: ModelBundle, text: torch.Tensor) -> "ClipScorer":
        """A scorer over precomputed L2-normalised class text embeddings `text` (K, P)."""
        scorer = cls.__new__(cls)
        scorer.bundle, scorer.text = bundle, text
        return scorer

    @torch.no_grad()
    def score_pixels(self, pixels: torch.Tensor) -> Scores:
        sims = (self.bundle.clip_image_features(pixels) @ self.text.T).float().cpu()  # (B, K)
        return Scores(sims, torch.zeros_like(sims, dtype=torch.long), 0)


def _prefiltered(scorer: str, prefilter_m: int, num_classes: int) -> bool:
    """Whether the diffusion scorer first keeps the clip top `prefilter_m` (0: never)."""
    return scorer == "diffusion" and 0 < prefilter_m < num_classes


def _fused_diffuses(scorer: str, fused: FusedState | None) -> bool:
    """Whether the fused scorer of this state runs its diffusion part (a fitted weight)."""
    return scorer == "fused" and fused is not None and fused.params.w_diffusion > 0


def _check_scorer(scorer: str, hybrid_m: int) -> None:
    if scorer not in ("diffusion", "clip", "hybrid", "fused"):
        raise UserError(f"--scorer must be diffusion, clip, hybrid or fused, not '{scorer}'")
    if scorer == "hybrid" and hybrid_m < 1:
        raise UserError(f"--hybrid-m must be >= 1, not {hybrid_m}")


class Classifier:
    """One entry point for all scorers: `score(pixels)` on (B, 3, H, W) in [-1, 1]."""

    def __init__(
        self,
        bundle: ModelBundle,
        tokens: TokenSet,
        table: TokenTable,
        scorer: str = "diffusion",
        hybrid_m: int = 10,
        n_samples: str | list[int] = "8,16,32",
        to_keep: str | list[int] = "5,2,1",
        batch_rows: int = 256,
        template: str = TEMPLATES[0],
        seed: int = 0,
        fused: FusedState | None = None,
        stop_level: float = 0.0,
        prefilter_m: int = 20,
    ):
        _check_scorer(scorer, hybrid_m)
        prompts = [tokens.prompt(k, template) for k in range(tokens.num_classes)]
        prefiltered = _prefiltered(scorer, prefilter_m, tokens.num_classes)
        if prefiltered and bundle.clip is None:
            raise UserError(
                f"the diffusion scorer keeps the clip top --prefilter-m {prefilter_m} of the "
                f"{tokens.num_classes} classes, but model '{bundle.spec}' has no CLIP vision "
                "tower: pass --clip PATH, or --prefilter-m 0 for the full schedule "
                "(K x n_samples UNet rows per image)"
            )
        with torch.no_grad():
            clipped = scorer != "diffusion" or prefiltered
            text = tokens.clip_text_features(table, prompts) if clipped else None
            diffused = scorer in ("diffusion", "hybrid") or _fused_diffuses(scorer, fused)
            cond = tokens.class_conditioning(table, template) if diffused else None
        self._build(
            bundle, scorer, cond, text, hybrid_m, n_samples, to_keep, batch_rows, seed,
            fused=fused, stop_level=stop_level, prefilter_m=prefilter_m,
        )  # fmt: skip

    @classmethod
    def from_conditioning(
        cls,
        bundle: ModelBundle,
        scorer: str = "diffusion",
        cond: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        hybrid_m: int = 10,
        n_samples: str | list[int] = "8,16,32",
        to_keep: str | list[int] = "5,2,1",
        batch_rows: int = 256,
        seed: int = 0,
        fused: FusedState | None = None,
        prefilter_m: int = 0,
    ) -> "Classifier":
        """A classifier over precomputed per-class inputs instead of class tokens: `cond`
        (K, L, d) UNet conditioning for the diffusion and hybrid scorers, `text_features`
        (K, P) L2-normalised CLIP text embeddings for the clip, hybrid and fused scorers (e.g.
        the prompts of true class names, or conditioning another classifier already computed).
        prefilter_m > 0: the diffusion scorer's clip prefilter, as in the constructor (it then
        needs `text_features` too when K > prefilter_m); off by default here."""
        _check_scorer(scorer, hybrid_m)
        diffused = scorer in ("diffusion", "hybrid") or _fused_diffuses(scorer, fused)
        K = len(cond) if diffused and cond is not None else 0
        if _prefiltered(scorer, prefilter_m, K) and text_features is None:
            raise ValueError(
                f"the diffusion scorer's prefilter (K = {K} > {prefilter_m}) needs text_features"
            )
        if (diffused and cond is None) or (scorer != "diffusion" and text_features is None):
            need = {
                "diffusion": "cond",
                "clip": "text_features",
                "hybrid": "cond and text_features",
                "fused": "text_features (and cond: its state has a diffusion part)",
            }
            raise ValueError(f"the {scorer} scorer needs {need[scorer]}")
        clf = cls.__new__(cls)
        clf._build(
            bundle,
            scorer,
            cond,
            text_features,
            hybrid_m,
            n_samples,
            to_keep,
            batch_rows,
            seed,
            fused,
            prefilter_m=prefilter_m,
        )
        return clf

    @classmethod
    def from_settings(
        cls,
        bundle: ModelBundle,
        tokens: TokenSet,
        table: TokenTable,
        settings: "ScorerSettings",
        scorer: str,
        fused: FusedState | None = None,
    ) -> "Classifier":
        """The classifier of a settings object's scorer fields (hybrid_m, prefilter_m, n_samples,
        to_keep, batch_rows, template, seed): `mcti eval/classify` and the server build theirs here.
        `fused`: the token set's fused state (mcti.core.fused.load_fused), for the fused scorer."""
        return cls(
            bundle,
            tokens,
            table,
            scorer=scorer,
            hybrid_m=settings.hybrid_m,
            n_samples=settings.n_samples,
            to_keep=settings.to_keep,
            batch_rows=settings.batch_rows,
            template=settings.template,
            seed=settings.seed,
            fused=fused,
            stop_level=settings.stop_level,
            prefilter_m=settings.prefilter_m,
        )

    def _build(
        self,
        bundle: ModelBundle,
        scorer: str,
        cond: torch.Tensor | None,
        text: torch.Tensor | None,
        hybrid_m: int,
        n_samples: str | list[int],
        to_keep: str | list[int],
        batch_rows: int,
        seed: int,
        fused: FusedState | None = None,
        stop_level: float = 0.0,
        prefilter_m: int = 0,
    ) -> None:
        self.bundle, self.kind = bundle, scorer
        self.K = len(cond) if scorer in ("diffusion", "hybrid") else len(text)
        # classes the clip scorer keeps for diffusion to rank (hybrid; diffusion at K > m), or None
        self.prefilter = min(hybrid_m, self.K) if scorer == "hybrid" else None
        if _prefiltered(scorer, prefilter_m, self.K):
            self.prefilter = prefilter_m
        self.clip = self.diffusion = self.fused = None
        if scorer != "diffusion" or self.prefilter:
            self.clip = ClipScorer.from_text_features(bundle, text)
        if scorer == "fused":
            if fused is None or fused.num_classes != self.K:
                raise UserError(
                    f"the fused scorer needs the token set's fused state ({self.K} classes)"
                )
            self.fused = fused
            if _fused_diffuses(scorer, fused):
                self.diffusion = DiffusionScorer.for_fused(
                    bundle, cond, fused.params, batch_rows, seed
                )
        elif scorer != "clip":
            # diffusion ranks only the clip prefilter's top m (if any), so keep at most m
            schedule = parse_schedule(n_samples, to_keep, self.prefilter or self.K)
            self.diffusion = DiffusionScorer.from_conditioning(
                bundle, cond, schedule, batch_rows, seed, stop_level
            )

    @torch.no_grad()
    def score(self, pixels: torch.Tensor) -> Scores:
        if self.kind == "clip":
            return self.clip.score_pixels(pixels)
        if self.kind == "fused":
            parts = self.fused_parts(pixels)
            logp = self.fused.combine(parts).log_softmax(1)
            return Scores(
                logp, torch.zeros_like(logp, dtype=torch.long), parts.unet_rows, logp.exp()
            )
        x0 = self.bundle.encode_images(pixels)
        if not self.prefilter:
            return self.diffusion.score_latents(x0)
        cand = self.clip.score_pixels(pixels).scores.topk(self.prefilter, dim=1).indices  # (B, m)
        return self.diffusion.score_latents(x0, candidates=cand)

    @torch.no_grad()
    def fused_parts(self, pixels: torch.Tensor) -> FusedParts:
        """The fused scorer's per-image inputs (`FusedState.combine` fuses them): the cache, the
        token cosines and, when the state has a diffusion part, the candidates' errors."""
        f = self.bundle.clip_image_features(pixels).float().cpu()  # (B, P)
        parts = FusedParts(self.fused.cache_logp(f), f @ self.clip.text.float().cpu().T)
        if self.diffusion is not None:
            x0 = self.bundle.encode_images(pixels)
            cand = self.fused.candidates(parts.cache).to(x0.device)  # (B, m)
            s = self.diffusion.score_latents(x0, candidates=cand)
            parts.diffusion, parts.unet_rows = s.scores.float(), s.unet_rows
        return parts

    @classmethod
    def for_scorers(
        cls,
        bundle: ModelBundle,
        tokens: TokenSet,
        table: TokenTable,
        settings,
        scorers: list[str],
        fused: FusedState | None = None,
    ) -> dict[str, "Classifier"]:
        """One classifier per scorer of one token set (the server hosts them side by side), built
        as `from_settings` builds each, with the token conditioning computed once: diffusion and
        hybrid share one (K, L, d) conditioning, clip and hybrid one set of CLIP text features.
        The scorers read `tokens` through a view that remembers what it has encoded."""
        encoded: dict = {}

        class Remembering:  # `tokens`, each encoding computed on first use
            def __getattr__(self, name):
                return getattr(tokens, name)

            def class_conditioning(self, table: TokenTable, template: str) -> torch.Tensor:
                key = ("cond", template)
                if key not in encoded:
                    encoded[key] = tokens.class_conditioning(table, template)
                return encoded[key]

            def clip_text_features(self, table: TokenTable, prompts: list[str]) -> torch.Tensor:
                key = ("clip", tuple(prompts))
                if key not in encoded:
                    encoded[key] = tokens.clip_text_features(table, prompts)
                return encoded[key]

        view = Remembering()
        return {s: cls.from_settings(bundle, view, table, settings, s, fused) for s in scorers}
