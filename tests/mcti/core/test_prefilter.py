"""The diffusion scorer's clip prefilter (`--prefilter-m`): with more classes than m it ranks only
the clip top m, so its UNet rows per image do not grow with K (issue 13)."""

import dataclasses

import pytest
import torch

from mcti.core.scoring import Classifier
from mcti.core.tokens import TokenSet, TokenTable
from mcti.errors import UserError
from mcti.settings import ScorerSettings

SCHEDULE = dict(n_samples="2,4", to_keep="3,1")  # rows/image: m * 2 + 3 * 2 (m classes scored)


def random_tokens(bundle, k: int) -> tuple[TokenSet, TokenTable]:
    """K distinct random class vectors; the first j classes of K are those of any K' > j."""
    tokens = TokenSet(bundle, num_classes=k)
    table = TokenTable(k, 1, tokens.init_vector("object"))
    with torch.no_grad():
        table.vectors.normal_(std=2.0, generator=torch.Generator().manual_seed(0))
    return tokens, table


def classifier(bundle, k: int, m: int, scorer: str = "diffusion") -> Classifier:
    tokens, table = random_tokens(bundle, k)
    settings = ScorerSettings(prefilter_m=m, hybrid_m=max(m, 1), **SCHEDULE)
    return Classifier.from_settings(bundle, tokens, table, settings, scorer)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


@torch.no_grad()
def test_rows_per_image_are_flat_in_k(tiny_bundle, pixels):
    m = 5
    at_m = classifier(tiny_bundle, m, m).score(pixels)
    at_50 = classifier(tiny_bundle, 50, m).score(pixels)
    assert at_m.unet_rows == at_50.unet_rows == 3 * (m * 2 + 3 * 2)
    full = classifier(tiny_bundle, 50, 0).score(pixels)  # 0: off, every class scored
    assert full.unet_rows == 3 * (50 * 2 + 3 * 2)
    assert torch.isfinite(full.scores).all()


@torch.no_grad()
def test_the_prefilter_keeps_the_clip_top_m_as_hybrid_does(tiny_bundle, pixels):
    m = 4
    pre = classifier(tiny_bundle, 30, m).score(pixels)
    clip = classifier(tiny_bundle, 30, m, "clip").score(pixels)
    hybrid = classifier(tiny_bundle, 30, m, "hybrid").score(pixels)
    top = clip.scores.topk(m, dim=1).indices
    for i in range(len(pixels)):
        scored = torch.isfinite(pre.scores[i]).nonzero().flatten()
        assert torch.equal(scored, top[i].sort().values)
        assert pre.ranking()[i, 0] in top[i]
    torch.testing.assert_close(pre.scores, hybrid.scores)  # same candidates, grid and noise
    assert torch.equal(pre.ranking(), hybrid.ranking()) and pre.unet_rows == hybrid.unet_rows


@torch.no_grad()
def test_k_up_to_m_is_unchanged(tiny_bundle, pixels):
    at_m = classifier(tiny_bundle, 6, 6)
    assert at_m.clip is None  # no CLIP work at all when K <= m
    a, b = at_m.score(pixels), classifier(tiny_bundle, 6, 0).score(pixels)
    torch.testing.assert_close(a.scores, b.scores)
    assert a.unet_rows == b.unet_rows and torch.isfinite(a.scores).all()


def test_a_model_without_clip_needs_the_prefilter_off(tiny_bundle):
    no_clip = dataclasses.replace(tiny_bundle, clip=None)
    with pytest.raises(UserError, match="--prefilter-m 0"):
        classifier(no_clip, 8, 4)
    assert classifier(no_clip, 8, 0).K == 8  # off: the full schedule, as before
    assert classifier(no_clip, 4, 4).K == 4  # K <= m: no prefilter needed


def test_from_conditioning_prefilter_needs_text_features(tiny_bundle):
    cond = torch.zeros(8, 77, 32)
    with pytest.raises(ValueError, match="needs text_features"):
        Classifier.from_conditioning(tiny_bundle, "diffusion", cond, prefilter_m=4)
    assert Classifier.from_conditioning(tiny_bundle, "diffusion", cond).prefilter is None


def test_prefilter_m_is_a_flag_with_a_bound(capsys):
    from mcti.cli import build_parser
    from mcti.flags import to_dataclass
    from mcti.settings import EvalArgs

    ns = build_parser().parse_args(["eval", "--tokens", "t", "--data", "d", "--prefilter-m", "7"])
    assert to_dataclass(EvalArgs, ns).prefilter_m == 7
    assert ScorerSettings().prefilter_m == 20
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--tokens", "t", "--data", "d", "--prefilter-m", "-1"])
    assert capsys.readouterr().err == "mcti eval: error: --prefilter-m must be >= 0 (not '-1')\n"
