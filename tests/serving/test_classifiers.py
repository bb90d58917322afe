"""Classifier.for_scorers, as the server builds its scorers: one conditioning per token set."""

import torch

from benchmarks.common import random_token_set
from mcti.core.scoring import Classifier
from mcti.core.store import load_tokens
from serving.config import AppConfig


def test_for_scorers_shares_conditioning_and_scores_like_from_settings(tmp_path, tiny_bundle):
    path = random_token_set(tiny_bundle, tmp_path / "tok", ["a", "b", "c", "d"], seed=3)
    tokens, table, _, _ = load_tokens(path, tiny_bundle)
    cfg = AppConfig(tokens=str(path), n_samples="2,4", to_keep="2,1", hybrid_m=3)
    calls = {"cond": 0, "clip": 0}
    real_cond, real_clip = tokens.class_conditioning, tokens.clip_text_features

    class Counting:  # the token set, counting its encodings
        def __getattr__(self, name):
            return getattr(tokens, name)

        def class_conditioning(self, *a, **k):
            calls["cond"] += 1
            return real_cond(*a, **k)

        def clip_text_features(self, *a, **k):
            calls["clip"] += 1
            return real_clip(*a, **k)

    got = Classifier.for_scorers(
        tiny_bundle, Counting(), table, cfg, ["diffusion", "clip", "hybrid"]
    )
    assert set(got) == {"diffusion", "clip", "hybrid"}
    assert calls == {"cond": 1, "clip": 1}  # each computed once, not once per scorer
    assert got["hybrid"].diffusion.cond is got["diffusion"].diffusion.cond
    assert got["hybrid"].clip.text is got["clip"].clip.text
    pixels = torch.rand(2, 3, tiny_bundle.resolution, tiny_bundle.resolution) * 2 - 1
    for scorer, clf in got.items():
        want = Classifier.from_settings(tiny_bundle, tokens, table, cfg, scorer).score(pixels)
        s = clf.score(pixels)
        assert torch.equal(s.scores, want.scores) and torch.equal(s.stage, want.stage), scorer
