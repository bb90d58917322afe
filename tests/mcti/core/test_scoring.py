"""Diffusion scorer vs a plain per-(image, class, t) loop; schedule validation; hybrid/clip."""

import pytest
import torch

from mcti.core.scoring import Classifier, DiffusionScorer, parse_schedule, timestep_grid
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
