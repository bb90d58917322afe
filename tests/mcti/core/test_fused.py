"""The fused scorer: leave-one-out cache, weights fitted from evidence, save/load, the
Classifier's `fused` kind and its calibrated probabilities, and the ECE."""

import json
import subprocess
import sys

import pytest
import torch

from mcti.core.fused import (
    FUSED_JSON,
    FUSED_TENSORS,
    cache_logp,
    fit_for_tokens,
    fit_fused,
    load_fused,
    save_fused,
)
from mcti.core.scoring import Classifier
from mcti.core.tokens import TokenSet, TokenTable
from mcti.errors import UserError
from mcti.eval.evaluate import expected_calibration_error


def clusters(K: int, per: int, spread: float, seed: int, dim: int = 16):
    """L2-normalised features around K random centres, `per` per class; labels (K*per,)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, dim, generator=g)
    y = torch.arange(K).repeat_interleave(per)
    f = centres[y] + spread * torch.randn(K * per, dim, generator=g)
    return torch.nn.functional.normalize(f, dim=1), y


def test_leave_one_out_equals_scoring_without_the_shot():
    f, y = clusters(3, 3, 0.5, 0)
    loo = cache_logp(f, f, y, 3, beta=7.0, leave_out=True)  # (9, 3)
    for i in range(len(f)):
        keep = torch.arange(len(f)) != i
        ref = cache_logp(f[i : i + 1], f[keep], y[keep], 3, beta=7.0)
        torch.testing.assert_close(loo[i : i + 1], ref)
    # without leaving out, each shot finds itself: at a large beta it is always right
    assert (cache_logp(f, f, y, 3, beta=200.0).argmax(1) == y).all()


def test_cache_matches_a_per_class_reference_on_odd_shapes_and_large_beta():
    """The per-class sum equals logmeanexp over each class's shots written out class by class,
    at beta 80 (far shots would underflow in float32) and with unequal shots per class."""
    f, _ = clusters(5, 1, 0.3, 1, dim=13)  # 5 queries
    feats, _ = clusters(7, 3, 0.8, 2, dim=13)
    y = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 1, 4, 2])  # (21,)
    for beta in (3.0, 80.0):
        aff = beta * (f.double() @ feats.double().T - 1)  # (5, 21)
        lme = torch.stack(
            [
                aff[:, y == c].logsumexp(1) - torch.log(torch.tensor((y == c).sum().item()))
                for c in range(7)
            ],
            dim=1,
        )  # (5, 7)
        ref = lme.log_softmax(1).float()
        torch.testing.assert_close(cache_logp(f, feats, y, 7, beta=beta), ref)


def test_weights_follow_the_evidence():
    """Informative tokens with a useless cache get the larger weight, and the other way round;
    an equal-weight rule could not do both."""
    K, g = 4, torch.Generator().manual_seed(5)
    f_good, y = clusters(K, 10, 0.8, 1)  # the cache gets the left-out shots right
    f_noise = torch.nn.functional.normalize(torch.randn(len(y), 16, generator=g), dim=1)
    onehot = torch.nn.functional.one_hot(y, K).float()
    cos_good = 0.5 * onehot + 0.05 * torch.randn(len(y), K, generator=g)
    cos_noise = 0.1 * torch.randn(len(y), K, generator=g)

    tokens_reliable = fit_fused(f_noise, y, K, cos_good, token_shrink=1.0).params
    assert tokens_reliable.w_tokens > 3 * tokens_reliable.w_cache

    cache_reliable = fit_fused(f_good, y, K, cos_noise, token_shrink=1.0).params
    assert cache_reliable.w_cache > 3 * cache_reliable.w_tokens
    assert cache_reliable.evidence["cache_loo_acc"] > 0.9

    shrunk = fit_fused(f_noise, y, K, cos_good, token_shrink=0.5).params
    assert shrunk.w_tokens == pytest.approx(0.5 * tokens_reliable.w_tokens, rel=1e-4)
    assert fit_fused(f_good, y, K, None).params.w_tokens == 0.0


def test_save_load_round_trip_and_refusals(tmp_path):
    f, y = clusters(3, 2, 0.3, 2)
    state = fit_fused(f, y, 3, 0.1 * torch.randn(len(y), 3), token_shrink=0.5)
    save_fused(tmp_path, state)
    back = load_fused(tmp_path, 3)
    torch.testing.assert_close(back.features, state.features)
    assert back.labels.tolist() == y.tolist() and back.params == state.params
    q = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    cos = torch.randn(4, 3)
    torch.testing.assert_close(back.logits(q, cos), state.logits(q, cos))

    with pytest.raises(UserError, match="does not match its token set"):
        load_fused(tmp_path, 4)
    meta = json.loads((tmp_path / FUSED_JSON).read_text())
    del meta["beta"]
    (tmp_path / FUSED_JSON).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="corrupt"):
        load_fused(tmp_path, 3)
    (tmp_path / FUSED_JSON).write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_fused(tmp_path, 3)
    (tmp_path / FUSED_TENSORS).unlink()
    with pytest.raises(UserError, match="no fused scorer state"):
        load_fused(tmp_path, 3)


def test_classifier_fused_kind_gives_calibrated_probs(tiny_bundle):
    K = 3
    tokens = TokenSet(tiny_bundle, num_classes=K)
    table = TokenTable(K, 1, tokens.init_vector("object"))
    with torch.no_grad():
        table.vectors.normal_(std=2.0, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(4)
    shots = torch.rand(6, 3, tiny_bundle.resolution, tiny_bundle.resolution, generator=g) * 2 - 1
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    state = fit_for_tokens(tiny_bundle, tokens, table, shots, y)
    clf = Classifier(tiny_bundle, tokens, table, scorer="fused", fused=state)
    test = torch.rand(5, 3, tiny_bundle.resolution, tiny_bundle.resolution, generator=g) * 2 - 1
    s = clf.score(test)
    assert s.probs.shape == (5, K) and s.unet_rows == 0
    torch.testing.assert_close(s.probs.sum(1), torch.ones(5))
    # reference: the state's logits on the features and token cosines computed here
    f = tiny_bundle.clip_image_features(test).float()
    text = tokens.clip_text_features(table, [tokens.prompt(k) for k in range(K)]).float()
    torch.testing.assert_close(s.probs, state.logits(f, f @ text.T).softmax(1))
    assert s.ranking()[:, 0].tolist() == s.probs.argmax(1).tolist()
    # the other scorers have no calibrated probabilities
    assert Classifier(tiny_bundle, tokens, table, scorer="clip").score(test).probs is None
    with pytest.raises(UserError, match="fused state"):
        Classifier(tiny_bundle, tokens, table, scorer="fused")


def test_expected_calibration_error():
    # two images at confidence 0.9 (one right), two at 0.6 (both right): bins 13 and 9
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    truth = torch.tensor([0, 1, 0, 0])
    assert expected_calibration_error(probs, truth) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == pytest.approx(0.0)


def test_leave_one_out_fit_at_600_classes_fits_in_1_gib():
    """The cache's memory is O(B N), not O(B N K): the leave-one-out fit at K = 600 x 5 shots
    runs under a 1 GiB address-space limit (a (N, N, K) mask would ask for 21.6 GB). In a child
    process, since the limit cannot be lifted again."""
    code = (
        "import resource, torch\n"
        "from mcti.core.fused import cache_logp\n"
        "y = torch.arange(600).repeat_interleave(5)\n"
        "f = torch.nn.functional.normalize(torch.randn(len(y), 64), dim=1)\n"
        "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))\n"
        "out = cache_logp(f, f, y, 600, 20.0, leave_out=True)\n"
        "assert out.shape == (3000, 600) and torch.isfinite(out).all()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-500:]
