"""Scorers: images -> per-class scores (higher is better) and a ranking.

`diffusion` (Diffusion Classifier, Li et al. 2023): per image, a grid of (t, eps) pairs shared
by all classes; class error = mean ||target - pred(x_t, t, c)||^2 over the pairs it was scored
on; adaptive elimination in stages. Rows (image, class, t) of several images go through the UNet
together, up to `batch_rows` per pass; class conditioning is computed once per token set.
`clip`: cosine of CLIP image and class-prompt text embeddings. `hybrid`: clip top-m, then
diffusion among those. `fused`: the clip scorer's token cosines fused with a cache of the shots'
image features, weighted and calibrated on the shots (mcti.core.fused); it also gives `probs`.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mcti.core.diffusion import noised, row_errors
from mcti.core.fused import FusedState
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
    ):
        schedule = parse_schedule(n_samples, to_keep, tokens.num_classes)
        cond = tokens.class_conditioning(table, template)  # (K, L, d), once per token set
        self._build(bundle, cond, schedule, batch_rows, seed)

    @classmethod
    def from_conditioning(
        cls,
        bundle: ModelBundle,
        cond: torch.Tensor,
        schedule: tuple[list[int], list[int]],
        batch_rows: int = 256,
        seed: int = 0,
    ) -> "DiffusionScorer":
        """A scorer over precomputed class conditioning `cond` (K, L, d) and a schedule that
        `parse_schedule` returned."""
        scorer = cls.__new__(cls)
        scorer._build(bundle, cond, schedule, batch_rows, seed)
        return scorer

    def _build(
        self,
        bundle: ModelBundle,
        cond: torch.Tensor,
        schedule: tuple[list[int], list[int]],
        batch_rows: int,
        seed: int,
    ) -> None:
        if batch_rows < 1:
            raise UserError("--batch-rows must be >= 1")
        self.bundle, self.batch_rows, self.seed = bundle, batch_rows, seed
        self.cond, self.K = cond, len(cond)  # (K, L, d)
        self.n_samples, self.to_keep = schedule
        # One grid of the largest stage's size; each stage takes an evenly spaced subset of it
        # (cumulative), exactly like the reference implementation.
        T = bundle.num_train_timesteps
        self.grid = torch.tensor(timestep_grid(self.n_samples[-1], T))  # (N,)
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
        err_sum = torch.zeros(B, self.K, device=dev)
        n_done = torch.zeros(B, self.K, device=dev)
        alive = torch.ones(B, self.K, dtype=torch.bool, device=dev)
        if candidates is not None:
            alive = torch.zeros_like(alive).scatter_(1, candidates.to(dev), True)
        stage = torch.zeros(B, self.K, dtype=torch.long, device=dev)
        done_ids: set[int] = set()
        rows_run = 0
        for s, (ids, keep) in enumerate(zip(self.stage_ids, self.to_keep, strict=True)):
            new = torch.tensor(sorted(set(ids) - done_ids), dtype=torch.long, device=dev)
            done_ids |= set(ids)
            b, c = alive.nonzero(as_tuple=True)  # (A,) alive (image, class) pairs
            if len(new):
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
                rows_run += len(pair)
                err_sum.index_put_((b, c), errs.sum(1), accumulate=True)
                n_done.index_put_(
                    (b, c), torch.full_like(b, len(new), dtype=torch.float), accumulate=True
                )
            stage[alive] = s + 1
            mean = torch.where(alive, err_sum / n_done.clamp(min=1), torch.inf)
            kth = mean.topk(min(keep, self.K), dim=1, largest=False).indices
            alive = torch.zeros_like(alive).scatter_(1, kth, True) & alive
        stage[alive] += 1  # the final survivor(s)
        scores = torch.where(n_done > 0, -err_sum / n_done.clamp(min=1), -torch.inf)
        return Scores(scores.cpu(), stage.cpu(), rows_run)


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
    ):
        _check_scorer(scorer, hybrid_m)
        prompts = [tokens.prompt(k, template) for k in range(tokens.num_classes)]
        with torch.no_grad():
            text = tokens.clip_text_features(table, prompts) if scorer != "diffusion" else None
            diffused = scorer in ("diffusion", "hybrid")
            cond = tokens.class_conditioning(table, template) if diffused else None
        self._build(
            bundle, scorer, cond, text, hybrid_m, n_samples, to_keep, batch_rows, seed, fused
        )

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
    ) -> "Classifier":
        """A classifier over precomputed per-class inputs instead of class tokens: `cond`
        (K, L, d) UNet conditioning for the diffusion and hybrid scorers, `text_features`
        (K, P) L2-normalised CLIP text embeddings for the clip, hybrid and fused scorers (e.g.
        the prompts of true class names, or conditioning another classifier already computed)."""
        _check_scorer(scorer, hybrid_m)
        diffused = scorer in ("diffusion", "hybrid")
        if (diffused and cond is None) or (scorer != "diffusion" and text_features is None):
            need = {
                "diffusion": "cond",
                "clip": "text_features",
                "hybrid": "cond and text_features",
                "fused": "text_features",
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
        """The classifier of a settings object's scorer fields (hybrid_m, n_samples, to_keep,
        batch_rows, template, seed): `mcti eval/classify` and the server build theirs here.
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
    ) -> None:
        self.bundle, self.kind, self.hybrid_m = bundle, scorer, hybrid_m
        self.K = len(cond) if scorer in ("diffusion", "hybrid") else len(text)
        self.clip = self.diffusion = self.fused = None
        if scorer != "diffusion":
            self.clip = ClipScorer.from_text_features(bundle, text)
        if scorer == "fused":
            if fused is None or fused.num_classes != self.K:
                raise UserError(
                    f"the fused scorer needs the token set's fused state ({self.K} classes)"
                )
            self.fused = fused
        elif scorer != "clip":
            # hybrid: diffusion ranks only the clip prefilter's top m, so keep at most m
            m = min(hybrid_m, self.K) if scorer == "hybrid" else self.K
            schedule = parse_schedule(n_samples, to_keep, m)
            self.diffusion = DiffusionScorer.from_conditioning(
                bundle, cond, schedule, batch_rows, seed
            )

    @torch.no_grad()
    def score(self, pixels: torch.Tensor) -> Scores:
        if self.kind == "clip":
            return self.clip.score_pixels(pixels)
        if self.kind == "fused":
            f = self.bundle.clip_image_features(pixels).float().cpu()  # (B, P)
            logp = self.fused.logits(f, f @ self.clip.text.float().cpu().T).log_softmax(1)
            return Scores(logp, torch.zeros_like(logp, dtype=torch.long), 0, logp.exp())
        x0 = self.bundle.encode_images(pixels)
        if self.kind == "diffusion":
            return self.diffusion.score_latents(x0)
        pre = self.clip.score_pixels(pixels)
        cand = pre.scores.topk(min(self.hybrid_m, self.K), dim=1).indices
        return self.diffusion.score_latents(x0, candidates=cand)

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
