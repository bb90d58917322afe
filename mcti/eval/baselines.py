"""Reference classifiers on the same frozen model, beside the few-shot method.

- True names (zero-shot): the core `Classifier` with each class conditioned on its true name's
  prompt; an upper reference the method never gets (it sees opaque labels only). `mcti
  pretrain` tracks it while training; `mcti demo` and `benchmarks/accuracy.py` report it.
- Linear probe and nearest class mean on the model's CLIP image features of the same shots.
"""

import torch

from mcti.core.model import ModelBundle
from mcti.core.scoring import Classifier
from mcti.core.tokens import TEMPLATES, TokenSet, project_text
from mcti.data.offline import Split, held_out_sample

PROBE_C = 10.0  # inverse L2 strength of the linear probe (benchmarks/RESULTS.md figures)


def true_name_classifier(
    bundle: ModelBundle,
    names: list[str],
    scorer: str = "diffusion",
    template: str = TEMPLATES[0],
    **kw,
) -> Classifier:
    """The core Classifier with each class's conditioning taken from its true name (the
    zero-shot upper reference; the few-shot method never sees names). `kw`: the scorer's
    hybrid_m, n_samples, to_keep, batch_rows, seed."""
    tokens = TokenSet(bundle, len(names))
    with torch.no_grad():
        hidden, pooled = tokens.encode(None, [template.format(n) for n in names])  # (K, L, d)
        text = project_text(bundle.require_clip(), pooled) if scorer != "diffusion" else None
    return Classifier.from_conditioning(bundle, scorer, hidden, text, **kw)


def predict(clf: Classifier, pixels: torch.Tensor, batch: int = 16, progress=None) -> torch.Tensor:
    """(N, 3, H, W) -> (N,) the best class of each image, scored `batch` images at a time."""
    starts = range(0, len(pixels), batch)
    starts = progress(starts) if progress else starts
    return torch.cat([clf.score(pixels[i : i + batch]).ranking()[:, 0] for i in starts])


def split_pixels(split: Split, indices, size: int) -> torch.Tensor:
    """Grey uint8 images of an offline split -> (N, 1, size, size) float in [-1, 1], through
    the path a folder written by `mcti.data.offline.write_folder` takes (a 28 px PNG, then
    `mcti.data.folders.pil_to_tensor`), so pretraining and evaluation see the same pixels."""
    from PIL import Image

    from mcti.data.folders import pil_to_tensor

    out = torch.empty(len(indices), 1, size, size)
    for j, i in enumerate(indices.tolist() if hasattr(indices, "tolist") else indices):
        im = Image.fromarray(split.images[i])
        if im.size != (28, 28):
            im = im.resize((28, 28), Image.BICUBIC)
        out[j] = pil_to_tensor(im, size)[:1]
    return out


def true_name_accuracy(
    bundle: ModelBundle,
    splits: dict[str, Split],
    per_class: int,
    scorer: str,
    n_samples: str = "8",
    to_keep: str = "1",
    seed: int = 0,
    classes: str = "seen",
    batch: int = 16,
    progress=None,
) -> dict:
    """Accuracy with true class names as prompts, per dataset, on held-out images of its seen
    (or novel) classes, among those classes only. Returns {dataset: acc, 'mean', 'pooled'}."""
    out, n_all, c_all = {}, 0, 0
    for ds, s in splits.items():
        ks = s.seen if classes == "seen" else s.novel
        if len(ks) < 2:
            continue
        idx = held_out_sample(s, ks, per_class, seed=seed + 7)
        x = split_pixels(s, idx, bundle.resolution).expand(-1, 3, -1, -1)  # (N, 3, H, W)
        truth = torch.tensor([ks.index(int(y)) for y in s.labels[idx]])
        kw = {} if scorer == "clip" else dict(n_samples=n_samples, to_keep=to_keep, seed=seed)
        clf = true_name_classifier(bundle, [s.names[k] for k in ks], scorer, **kw)
        bar = (lambda it, ds=ds: progress(it, desc=f"{scorer} {ds}")) if progress else None
        pred = predict(clf, x, batch, bar)
        out[ds] = round(float((pred == truth).float().mean()), 4)
        n_all += len(idx)
        c_all += int((pred == truth).sum())
    out["mean"] = round(sum(v for k, v in out.items()) / max(1, len(out)), 4)
    out["pooled"] = round(c_all / max(1, n_all), 4)
    return out


def linear_probe(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor
) -> torch.Tensor:
    """(N, P), (N,), (M, P) -> (M,) labels predicted by an L2-regularised multinomial logistic
    regression (scikit-learn, lbfgs, C = PROBE_C) fit on the training features."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=2000, C=PROBE_C)
    probe.fit(train_features.cpu().numpy(), train_labels.cpu().numpy())
    return torch.from_numpy(probe.predict(test_features.cpu().numpy()))


def nearest_class_mean(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
) -> torch.Tensor:
    """(N, P), (N,), (M, P) -> (M,) the class whose L2-normalised mean training feature has the
    highest dot product with each test feature (cosine, for normalised features)."""
    means = torch.stack([train_features[train_labels == k].mean(0) for k in range(num_classes)])
    means = torch.nn.functional.normalize(means, dim=-1)  # (K, P)
    return (test_features @ means.T).argmax(1)


def clip_feature_baselines(
    bundle: ModelBundle,
    train_pixels: torch.Tensor,
    train_labels: torch.Tensor,
    test_pixels: torch.Tensor,
    num_classes: int,
) -> dict[str, torch.Tensor]:
    """Predictions (M,) of the linear probe and the nearest class mean on the model's CLIP
    image features of the training shots (the model needs a CLIP vision tower)."""
    train = bundle.clip_image_features(train_pixels).cpu()  # (N, P)
    test = bundle.clip_image_features(test_pixels).cpu()  # (M, P)
    return {
        "linear probe (CLIP image features)": linear_probe(train, train_labels, test),
        "nearest class mean (CLIP image features)": nearest_class_mean(
            train, train_labels, test, num_classes
        ),
    }
