"""Reference classifiers: true names through the core Classifier, the linear probe against an
independent L2-regularised softmax regression, nearest class mean against numpy."""

import numpy as np
import pytest
import torch

from mcti.eval.baselines import (
    PROBE_C,
    clip_feature_baselines,
    linear_probe,
    nearest_class_mean,
    predict,
    true_name_classifier,
)


def test_true_name_classifier_equals_tokens_set_to_the_name_embeddings(tiny_bundle):
    """Reference: class tokens whose vectors are the names' own (single-token) embeddings give
    the same conditioning, hence the same scores, as prompting with the names."""
    from mcti.core.scoring import Classifier
    from mcti.core.tokens import TokenSet, TokenTable

    names = ["cat", "dog", "car"]
    ids = [tiny_bundle.tokenizer(n, add_special_tokens=False).input_ids for n in names]
    assert all(len(i) == 1 for i in ids)
    emb = tiny_bundle.text_encoder.get_input_embeddings().weight
    tokens = TokenSet(tiny_bundle, 3)
    table = TokenTable(3, 1, torch.zeros(tiny_bundle.hidden_size))
    with torch.no_grad():
        table.vectors.copy_(emb[[i[0] for i in ids]])
    x = torch.rand(4, 3, tiny_bundle.resolution, tiny_bundle.resolution) * 2 - 1
    for scorer, kw in (
        ("diffusion", dict(n_samples="4", to_keep="1")),
        ("clip", {}),
        ("hybrid", dict(n_samples="2,4", to_keep="2,1", hybrid_m=2)),
    ):
        ref = Classifier(tiny_bundle, tokens, table, scorer=scorer, **kw).score(x)
        got = true_name_classifier(tiny_bundle, names, scorer, **kw).score(x)
        torch.testing.assert_close(got.scores, ref.scores, rtol=1e-5, atol=1e-6)
        # predict: the top class of each image, whatever the batch
        assert torch.equal(
            predict(true_name_classifier(tiny_bundle, names, scorer, **kw), x, batch=3),
            ref.ranking()[:, 0],
        )


def _clusters(seed: int, n: int, spread: float):
    """(n, 6) features of 3 overlapping Gaussian classes, and labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 6, generator=g)
    y = torch.arange(n) % 3
    return centres[y] + spread * torch.randn(n, 6, generator=g), y


def _softmax_regression(x: torch.Tensor, y: torch.Tensor, C: float) -> tuple:
    """Independent reference: minimise 0.5 ||W||^2 + C * sum CE(xW^T + b, y) (bias not
    penalised: scikit-learn's multinomial objective) with torch's L-BFGS in float64."""
    x = x.double()
    W = torch.zeros(3, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=5000, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(x @ W.T + b, y, reduction="sum")
        loss = 0.5 * (W**2).sum() + C * ce
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def test_linear_probe_is_the_regularised_softmax_regression():
    xtr, ytr = _clusters(0, 60, spread=1.2)  # overlapping: regularisation matters
    xte, _ = _clusters(1, 200, spread=1.5)
    W, b = _softmax_regression(xtr, ytr, PROBE_C)
    margin = (xte.double() @ W.T + b).sort(1).values
    sure = (margin[:, -1] - margin[:, -2]) > 0.1  # near-ties: within lbfgs tolerance (1e-4)
    ref = (xte.double() @ W.T + b).argmax(1)
    got = linear_probe(xtr, ytr, xte)
    assert got.shape == (200,) and sure.sum() > 170
    assert torch.equal(got[sure], ref[sure])


def test_nearest_class_mean_matches_numpy():
    xtr, ytr = _clusters(2, 30, spread=1.0)
    xte, _ = _clusters(3, 50, spread=1.0)
    a, y, t = xtr.numpy(), ytr.numpy(), xte.numpy()
    means = np.stack([a[y == k].mean(0) for k in range(3)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    ref = (t @ means.T).argmax(1)
    assert np.array_equal(nearest_class_mean(xtr, ytr, xte, 3).numpy(), ref)


@pytest.mark.parametrize("name", ["linear probe", "nearest class mean"])
def test_clip_feature_baselines_use_the_models_clip_image_features(tiny_bundle, name):
    g = torch.Generator().manual_seed(0)
    xtr, xte = (
        torch.rand(9, 3, 32, 32, generator=g) * 2 - 1,
        torch.rand(5, 3, 32, 32, generator=g) * 2 - 1,
    )
    ytr = torch.arange(9) % 3
    got = clip_feature_baselines(tiny_bundle, xtr, ytr, xte, 3)[f"{name} (CLIP image features)"]
    ftr, fte = tiny_bundle.clip_image_features(xtr), tiny_bundle.clip_image_features(xte)
    ref = (
        linear_probe(ftr, ytr, fte)
        if name == "linear probe"
        else nearest_class_mean(ftr, ytr, fte, 3)
    )
    assert torch.equal(got, ref)
