"""Diffusion scorer vs a plain per-(image, class, t) loop; schedule validation; hybrid/clip."""

import pytest
import torch

from mcti.core.diffusion import separation_by_t, separation_ratio
from mcti.core.scoring import (
    Classifier,
    DiffusionScorer,
    grid_from_weights,
    parse_schedule,
    significantly_worse,
    spread_order,
    timestep_grid,
)
from mcti.core.tokens import TokenSet, TokenTable
from mcti.errors import UserError


@pytest.fixture(scope="module")
def token_set(tiny_bundle):
    tokens = TokenSet(tiny_bundle, num_classes=4)
    table = TokenTable(4, 1, tokens.init_vector("object"))
    with torch.no_grad():
        table.vectors.normal_(std=2.0, generator=torch.Generator().manual_seed(0))
    return tokens, table


def loop_errors(bundle, tokens, table, x0, ts, eps):
    """Reference: one UNet call per (image, class, t), plain MSE, float64 accumulation."""
    ac = bundle.scheduler.alphas_cumprod
    out = torch.zeros(len(x0), tokens.num_classes, dtype=torch.float64)
    for b in range(len(x0)):
        for k in range(tokens.num_classes):
            cond, _ = tokens.encode(table, [tokens.prompt(k)])
            for j, t in enumerate(ts):
                a = ac[t]
                x_t = a.sqrt() * x0[b : b + 1] + (1 - a).sqrt() * eps[j : j + 1]
                pred = bundle.unet(x_t, torch.tensor([t]), encoder_hidden_states=cond).sample
                out[b, k] += ((pred.double() - eps[j : j + 1].double()) ** 2).mean() / len(ts)
    return out


@torch.no_grad()
def test_exhaustive_scores_match_plain_loop(tiny_bundle, token_set):
    tokens, table = token_set
    x0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    scorer = DiffusionScorer(
        tiny_bundle, tokens, table, n_samples=[5], to_keep=[1], batch_rows=7, seed=11
    )
    s = scorer.score_latents(x0)
    eps = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(11))
    ref = loop_errors(tiny_bundle, tokens, table, x0, timestep_grid(5, 1000), eps)
    torch.testing.assert_close(-s.scores.double(), ref, atol=1e-5, rtol=1e-4)
    assert s.unet_rows == 3 * 4 * 5
    assert torch.equal(s.ranking()[:, 0], ref.argmin(1))


@torch.no_grad()
def test_elimination_keeps_the_best_and_is_deterministic(tiny_bundle, token_set):
    tokens, table = token_set
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    kw = dict(n_samples=[2, 4, 8], to_keep=[3, 2, 1], seed=5)
    a = DiffusionScorer(tiny_bundle, tokens, table, batch_rows=5, **kw).score_latents(x0)
    b = DiffusionScorer(tiny_bundle, tokens, table, batch_rows=64, **kw).score_latents(x0)
    torch.testing.assert_close(a.scores, b.scores)  # batching does not change results
    assert torch.equal(a.ranking(), b.ranking())
    # grid of 8 t; stage 1 takes t-indices {2, 6} for 4 classes, stage 2 {1, 3, 5, 7} (all new)
    # for 3 classes, stage 3 the remaining {0, 4} for 2 classes: the reference's subsets
    assert a.unet_rows == 2 * (4 * 2 + 3 * 4 + 2 * 2)
    assert (a.stage.max(1).values == 4).all() and ((a.stage == 4).sum(1) == 1).all()
    # the winner has the lowest error among the two finalists on the full grid
    exhaustive = DiffusionScorer(
        tiny_bundle, tokens, table, n_samples=[8], to_keep=[1], seed=5
    ).score_latents(x0)
    for i in range(2):
        finalists = (a.stage[i] >= 3).nonzero().flatten()
        best = finalists[exhaustive.scores[i, finalists].argmax()]
        assert a.ranking()[i, 0] == best


def test_schedule_validation():
    assert parse_schedule("2,4", "3,1", num_classes=2) == ([2, 4], [2, 1])
    for ns, tk in [("4,2", "2,1"), ("2,4", "1"), ("2,4", "2,2"), ("a", "1"), ("2,4", "1,2")]:
        with pytest.raises(UserError):
            parse_schedule(ns, tk, num_classes=5)


@torch.no_grad()
def test_hybrid_only_scores_clip_candidates(tiny_bundle, token_set):
    tokens, table = token_set
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    clip = Classifier(tiny_bundle, tokens, table, scorer="clip").score(pixels)
    hyb = Classifier(
        tiny_bundle, tokens, table, scorer="hybrid", hybrid_m=2, n_samples=[2, 4], to_keep=[2, 1]
    ).score(pixels)
    top2 = clip.scores.topk(2, dim=1).indices
    for i in range(2):
        scored = torch.isfinite(hyb.scores[i]).nonzero().flatten().sort().values
        assert torch.equal(scored, top2[i].sort().values)
        assert hyb.ranking()[i, 0] in top2[i]
    # clip scores are cosines against the class-prompt text features
    text = tokens.clip_text_features(table, [tokens.prompt(k) for k in range(4)])
    ref = tiny_bundle.clip_image_features(pixels) @ text.T
    torch.testing.assert_close(clip.scores, ref)


@torch.no_grad()
def test_from_conditioning_scores_as_the_token_classifier(tiny_bundle, token_set):
    """The conditioning and text features a token Classifier computes, given precomputed, give
    the same scores for every scorer; the hybrid's to_keep is clipped to hybrid_m once."""
    tokens, table = token_set
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cond, pooled = tokens.encode(table, [tokens.prompt(k) for k in range(4)])  # (4, L, d)
    text = torch.nn.functional.normalize(tiny_bundle.clip.text_projection(pooled), dim=-1)
    kw = dict(hybrid_m=3, n_samples="2,4", to_keep="4,1", seed=3)
    for scorer in ("diffusion", "clip", "hybrid"):
        ref = Classifier(tiny_bundle, tokens, table, scorer=scorer, **kw)
        got = Classifier.from_conditioning(tiny_bundle, scorer, cond, text, **kw)
        a, b = ref.score(pixels), got.score(pixels)
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(b.ranking(), a.ranking())
    assert got.diffusion.to_keep == [3, 1]  # hybrid: at most hybrid_m classes survive
    assert Classifier.from_conditioning(tiny_bundle, "diffusion", cond, None, **kw).K == 4


def test_classifier_argument_errors(tiny_bundle, token_set):
    tokens, table = token_set
    with pytest.raises(UserError, match="--scorer must be"):
        Classifier(tiny_bundle, tokens, table, scorer="knn")
    with pytest.raises(UserError, match="--hybrid-m must be >= 1"):
        Classifier(tiny_bundle, tokens, table, scorer="hybrid", hybrid_m=0)
    with pytest.raises(UserError, match="--to-keep"):  # parsed (and refused) on the hybrid path too
        Classifier(tiny_bundle, tokens, table, scorer="hybrid", to_keep="two,1")
    with pytest.raises(ValueError, match="needs cond and text_features"):
        Classifier.from_conditioning(tiny_bundle, "hybrid", cond=torch.zeros(4, 77, 32))


# --- fewer rows: the significance rule and the calibrated timestep grid ---------------------


class SyntheticErrors(DiffusionScorer):
    """The elimination loop of DiffusionScorer over a given per-(image, class, t) error table
    (B, K, N) instead of UNet rows: the rule is tested on errors whose answer is known."""

    def __init__(self, bundle, table, n_samples, to_keep, stop_level):
        self.bundle, self.table, self.stop_level, self.batch_rows = bundle, table, stop_level, 64
        self.seed = 0
        self.K = table.shape[1]
        self.n_samples, self.to_keep = parse_schedule(n_samples, to_keep, self.K)
        self.grid = torch.tensor(timestep_grid(self.n_samples[-1], 1000))
        self.stage_ids = [self._stage_ids(n) for n in self.n_samples]

    def score(self):
        return self.score_latents(torch.zeros(len(self.table), 1, 1, 1))

    def _run(self, x_t, t, target, errs_t, alive, ids):
        b, c = alive.nonzero(as_tuple=True)
        if not ids or not len(b):
            return 0
        new = torch.tensor(ids)
        errs_t[b.view(-1, 1), c.view(-1, 1), new.view(1, -1)] = self.table[b][:, :, new][
            torch.arange(len(b)), c
        ]
        return len(b) * len(ids)


def clear_cut(B=4, K=6, N=64, gap=0.05, seed=0):
    """errors ~0.1 + noise 0.01 per (image, class, t), the true class (b % K) lower by `gap`."""
    g = torch.Generator().manual_seed(seed)
    errs = 0.1 + 0.02 * torch.rand(B, 1, N, generator=g) + 0.01 * torch.randn(B, K, N, generator=g)
    errs[torch.arange(B), torch.arange(B) % K] -= gap
    return errs


def test_significance_rule_keeps_the_argmin_and_stops_early(tiny_bundle):
    errs = clear_cut()
    kw = dict(n_samples=[16, 64], to_keep=[3, 1])
    full = SyntheticErrors(tiny_bundle, errs, stop_level=0.0, **kw).score()
    fast = SyntheticErrors(tiny_bundle, errs, stop_level=0.01, **kw).score()
    truth = torch.arange(4) % 6
    assert torch.equal(errs.mean(2).argmin(1), truth)
    assert torch.equal(full.ranking()[:, 0], truth)
    assert torch.equal(fast.ranking()[:, 0], truth)  # the rule never changes the answer here
    assert full.unet_rows == 4 * (6 * 16 + 3 * 48)
    assert fast.unet_rows <= 4 * 6 * 8  # every image stops after its first chunk of 8 t
    assert (fast.stage.max(1).values == 3).all() and ((fast.stage == 3).sum(1) == 1).all()


def test_significance_rule_runs_the_full_schedule_on_ties(tiny_bundle):
    errs = clear_cut(gap=0.0)
    errs[:] = errs[:, :1]  # every class has the same error at every t: exact ties
    kw = dict(n_samples=[16, 64], to_keep=[3, 1])
    full = SyntheticErrors(tiny_bundle, errs, stop_level=0.0, **kw).score()
    fast = SyntheticErrors(tiny_bundle, errs, stop_level=0.2, **kw).score()
    assert fast.unet_rows == full.unet_rows == 4 * (6 * 16 + 3 * 48)
    assert torch.equal(fast.scores, full.scores) and torch.equal(fast.ranking(), full.ranking())


def test_significantly_worse_needs_draws_and_a_margin():
    errs = clear_cut(B=1, K=3, N=8)
    alive = torch.ones(1, 3, dtype=torch.bool)
    assert not significantly_worse(errs[:, :, :3], alive, 0.05).any()  # too few draws
    worse = significantly_worse(errs, alive, 0.05)
    assert worse.tolist() == [[False, True, True]]  # the leader (class 0) is never dropped
    alive[0, 2] = False
    assert significantly_worse(errs, alive, 0.05).tolist() == [[False, True, False]]


@torch.no_grad()
def test_rule_and_calibrated_grid_are_deterministic_on_the_unet(tiny_bundle, token_set):
    tokens, table = token_set
    x0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    w = torch.tensor([0.0, 0.0, 1.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    kw = dict(n_samples=[8, 16], to_keep=[2, 1], seed=2, stop_level=0.3, t_weights=w)
    a = DiffusionScorer(tiny_bundle, tokens, table, batch_rows=5, **kw).score_latents(x0)
    b = DiffusionScorer(tiny_bundle, tokens, table, batch_rows=64, **kw).score_latents(x0)
    torch.testing.assert_close(a.scores, b.scores)
    assert torch.equal(a.ranking(), b.ranking()) and a.unet_rows == b.unet_rows
    grid = DiffusionScorer(tiny_bundle, tokens, table, **kw).grid
    assert ((grid >= 200) & (grid < 500)).all()  # only the weighted band
    # identical conditioning for every class: ties, so the rule never stops an image early
    cond = tokens.class_conditioning(table)[:1].expand(4, -1, -1)
    sched = parse_schedule([8, 16], [2, 1], 4)
    tied = DiffusionScorer.from_conditioning(tiny_bundle, cond, sched, stop_level=0.3)
    assert tied.score_latents(x0).unet_rows == 3 * (4 * 8 + 2 * 8)


def test_grid_from_weights():
    assert grid_from_weights(torch.ones(10), 8, 1000) == timestep_grid(8, 1000)  # the old grid
    g = grid_from_weights(torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 0, 0.0]), 20, 1000)
    assert g == sorted(g) and min(g) >= 300 and max(g) < 500
    with pytest.raises(UserError, match="all zero"):
        grid_from_weights(torch.zeros(4), 8, 1000)
    assert sorted(spread_order(12)) == list(range(12)) and spread_order(4) == [0, 2, 1, 3]


def test_separation_picks_the_separating_band():
    """Classes differ only for t in bands 3-5 (of 10): the ratio is ~0 elsewhere and the grid
    drawn from it lies in that band."""
    g = torch.Generator().manual_seed(0)
    S, bins, draws, K = 12, 10, 2, 4
    labels = torch.arange(S) % K
    errs = 0.1 + 0.02 * torch.rand(S, bins, draws, 1, generator=g).expand(-1, -1, -1, K).clone()
    errs += 0.005 * torch.randn(S, bins, draws, K, generator=g)
    gap = torch.zeros(bins)
    gap[3:6] = 0.01
    errs += gap.view(1, bins, 1, 1) * (labels.view(S, 1) != torch.arange(K)).view(S, 1, 1, K)
    ratio = separation_ratio(errs, labels)
    assert ratio[3:6].min() > 10 * ratio[[0, 1, 2, 6, 7, 8, 9]].max()
    band = torch.where(ratio > 0.2 * ratio.max(), ratio, torch.zeros(()))
    grid = grid_from_weights(band, 16, 1000)
    assert min(grid) >= 300 and max(grid) < 600


@torch.no_grad()
def test_separation_by_t_on_the_unet(tiny_bundle, token_set):
    tokens, table = token_set
    cond = tokens.class_conditioning(table)
    x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    a = separation_by_t(tiny_bundle, cond, x0, labels, bins=4, draws=2, batch_rows=7)
    b = separation_by_t(tiny_bundle, cond, x0, labels, bins=4, draws=2, batch_rows=64)
    assert a.shape == (4,) and (a >= 0).all() and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_stop_level_setting_reaches_the_diffusion_scorer(tiny_bundle, token_set):
    from mcti.settings import ScorerSettings

    tokens, table = token_set
    clf = Classifier.from_settings(
        tiny_bundle, tokens, table, ScorerSettings(stop_level=0.05), "diffusion"
    )
    assert clf.diffusion.stop_level == 0.05
    with pytest.raises(UserError, match="--stop-level"):
        Classifier(tiny_bundle, tokens, table, stop_level=1.0)
