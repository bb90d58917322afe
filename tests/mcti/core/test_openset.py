"""Open-set scores, leave-one-out thresholds, metrics and the saved state (mcti/core/openset.py)."""

import json

import pytest
import torch

from mcti.core import openset
from mcti.core.openset import Evidence, Reference
from mcti.errors import UserError


def clusters(n_per_class: int, seed: int, spread=(0.3, 0.3), centres=None):
    """Features of 3 classes in 6 dims: (N, P) L2-normalised, (N,) labels."""
    g = torch.Generator().manual_seed(seed)
    centres = centres if centres is not None else torch.eye(6)[:3] * 3
    f, y = [], []
    for k, c in enumerate(centres):
        noise = torch.randn(n_per_class, 6, generator=g)
        noise[:, :2] *= torch.tensor(spread)
        noise[:, 2:] *= 0.05
        f.append(c + noise)
        y += [k] * n_per_class
    return torch.nn.functional.normalize(torch.cat(f), dim=-1), torch.tensor(y)


def test_auroc_and_fpr():
    known, unknown = torch.tensor([3.0, 4.0, 5.0]), torch.tensor([0.0, 1.0])
    assert openset.auroc(known, unknown) == 1.0
    assert openset.auroc(unknown, known) == 0.0
    assert openset.auroc(torch.ones(4), torch.ones(3)) == 0.5  # ties count half
    assert openset.fpr_at_recall(known, unknown, 0.95) == 0.0
    assert openset.fpr_at_recall(torch.arange(100.0), torch.tensor([50.0, 2.0]), 0.95) == 0.5


def test_leave_one_out_does_not_score_a_shot_against_itself():
    f, y = clusters(4, seed=0)
    ref = Reference(f, y, 3)
    in_sample = openset.knn(Evidence(features=f), ref)
    assert torch.allclose(in_sample, torch.ones(len(f)), atol=1e-5)  # each shot finds itself
    loo = openset.leave_one_out("knn", ref)
    assert len(loo) == len(f) and (loo < 0.9999).all()


def test_single_shot_classes_are_skipped_and_all_single_is_refused():
    f, y = clusters(2, seed=1)
    keep = torch.tensor([0, 1, 2, 4])  # class 0 two shots, classes 1 and 2 one each
    ref = Reference(f[keep], y[keep], 3)
    assert len(openset.leave_one_out("ncm", ref)) == 2
    with pytest.raises(UserError, match="2 or more training shots"):
        openset.leave_one_out("ncm", Reference(f[[0, 2, 4]], y[[0, 2, 4]], 3))


@pytest.mark.parametrize("score", sorted(openset.FEATURE_SCORES))
def test_auto_threshold_keeps_the_target_recall_and_rejects_a_new_class(score):
    shots, ys = clusters(32, seed=2)
    state = openset.fit(Reference(shots, ys, 3), [score])
    t = state.threshold(score, 0.9)
    test, _ = clusters(200, seed=3)
    # a fourth class, not among the known ones
    novel, _ = clusters(200, seed=4, centres=torch.eye(6)[3:4] * 3)
    fn = openset.REJECT_SCORES[score]
    known = fn(Evidence(features=test), state.reference)
    unknown = fn(Evidence(features=novel), state.reference)
    recall = float((known >= t).float().mean())
    assert 0.8 <= recall <= 0.99, recall
    assert float((unknown < t).float().mean()) > 0.95
    assert openset.auroc(known, unknown) > 0.98


def test_mahalanobis_uses_the_classes_own_spread():
    # known classes vary a lot along dim 0 and little along dim 1: an unknown image a small
    # step off along dim 1 is far in Mahalanobis terms, though close in cosine
    centres = torch.tensor([[0.0, 0, 3, 0, 0, 0], [0.0, 0, 0, 3, 0, 0], [0.0, 0, 0, 0, 3, 0]])
    shots, ys = clusters(16, seed=5, spread=(1.0, 0.05), centres=centres)
    known, _ = clusters(100, seed=6, spread=(1.0, 0.05), centres=centres)
    off = centres + torch.tensor([0.0, 0.6, 0, 0, 0, 0])
    unknown, _ = clusters(100, seed=7, spread=(0.05, 0.05), centres=off)
    ref = Reference(shots, ys, 3)
    maha = openset.auroc(
        openset.mahalanobis(Evidence(features=known), ref),
        openset.mahalanobis(Evidence(features=unknown), ref),
    )
    cos = openset.auroc(
        openset.ncm(Evidence(features=known), ref), openset.ncm(Evidence(features=unknown), ref)
    )
    assert maha > 0.8 and maha > cos + 0.2, (maha, cos)


def test_scorer_scores_are_scale_free_and_unscored_classes_ignored():
    s = torch.tensor([[5.0, 1.0, 0.0, -torch.inf], [2.0, 1.9, 1.8, -torch.inf]])
    for name in ("msp", "margin"):
        fn = openset.REJECT_SCORES[name]
        a, b = fn(Evidence(scores=s), None), fn(Evidence(scores=s * 1000), None)
        assert torch.allclose(a, b) and a[0] > a[1] and torch.isfinite(a).all()
    with pytest.raises(UserError, match="scores"):
        openset.leave_one_out("margin", Reference(torch.zeros(2, 3), torch.tensor([0, 0]), 1))


def test_state_round_trip_and_corrupt_files(tmp_path):
    f, y = clusters(3, seed=8)
    state = openset.fit(Reference(f, y, 3))
    state.save(tmp_path)
    back = openset.load(tmp_path, 3)
    assert back.loo == state.loo and torch.equal(back.reference.features, f)
    assert back.threshold("ncm", 0.95) == pytest.approx(state.threshold("ncm", 0.95))
    assert openset.load(tmp_path / "none", 3) is None
    with pytest.raises(UserError, match="does not match"):
        openset.load(tmp_path, 4)
    meta = json.loads((tmp_path / openset.JSON_FILE).read_text())
    del meta["loo"]
    (tmp_path / openset.JSON_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="corrupt"):
        openset.load(tmp_path, 3)
    (tmp_path / openset.JSON_FILE).write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        openset.load(tmp_path, 3)
