"""`mcti eval` and `mcti classify`: score images with a token set; accuracy, confusion and, for
scorers with calibrated probabilities (fused), expected calibration error."""

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mcti.core.fused import load_fused
from mcti.core.model import ModelBundle, load_model
from mcti.core.scoring import Classifier, Scores
from mcti.core.store import load_tokens, read_meta
from mcti.data.folders import ImageFolder, load_images
from mcti.errors import UserError
from mcti.settings import ScoreArgs


@dataclass
class Loaded:
    bundle: ModelBundle
    labels: list[str]
    meta: dict
    classifier: Classifier


def load_classifier(cfg: ScoreArgs, bundle: ModelBundle | None = None) -> Loaded:
    if bundle is None:
        spec = cfg.model or read_meta(cfg.tokens)["base_model"]["spec"]
        bundle = load_model(spec, cfg.device, cfg.precision, cfg.attention, cfg.clip)
    tokens, table, labels, meta = load_tokens(cfg.tokens, bundle)
    if cfg.batch_images < 1:
        raise UserError("--batch-images must be >= 1")
    fused = load_fused(cfg.tokens, len(labels)) if cfg.scorer == "fused" else None
    clf = Classifier.from_settings(bundle, tokens, table, cfg, cfg.scorer, fused)
    return Loaded(bundle, labels, meta, clf)


def score_all(
    loaded: Loaded, pixels: torch.Tensor, batch: int, desc: str = "score", quiet: bool = False
) -> Scores:
    """Score (N, 3, H, W) images in groups of `batch`; returns concatenated Scores."""
    parts = []
    for i in tqdm(
        range(0, len(pixels), batch), desc=desc, unit="batch", disable=quiet, dynamic_ncols=True
    ):
        parts.append(loaded.classifier.score(pixels[i : i + batch]))
    probs = [p.probs for p in parts]
    return Scores(
        torch.cat([p.scores for p in parts]),
        torch.cat([p.stage for p in parts]),
        sum(p.unet_rows for p in parts),
        torch.cat(probs) if all(p is not None for p in probs) else None,
    )


def expected_calibration_error(probs: torch.Tensor, truth: torch.Tensor, bins: int = 15) -> float:
    """ECE of the top-1 probability: sum over equal-width confidence bins of
    (bin share) * |accuracy - mean confidence|. probs (N, K), truth (N,)."""
    conf, pred = probs.max(1)
    correct = (pred == truth).float()
    which = (conf * bins).long().clamp(max=bins - 1)  # (N,) bin of each image
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += float(m.float().mean()) * abs(float(correct[m].mean() - conf[m].mean()))
    return ece


def evaluate(
    loaded: Loaded,
    data: ImageFolder,
    indices: list[int],
    batch: int,
    quiet: bool = False,
    rejector=None,
) -> dict:
    """Accuracy, top-5, per-class accuracy, confusion matrix, speed; with a `rejector`
    (mcti.eval.openset.Rejector) also the rejected fraction and the accuracy with rejection on
    (an image counts as right only when it is kept and its label is right)."""
    labels = loaded.labels
    unknown = sorted(set(data.classes) - set(labels))
    if unknown:
        raise UserError(f"data has label(s) not in the token set: {', '.join(unknown[:5])}")
    pixels, kept = load_images(data, indices, loaded.bundle.resolution)
    truth = torch.tensor([labels.index(data.classes[data.labels[i]]) for i in kept])
    t0 = time.perf_counter()
    s = score_all(loaded, pixels, batch, desc="eval", quiet=quiet)
    seconds = time.perf_counter() - t0
    ranking = s.ranking()
    pred = ranking[:, 0]
    K = len(labels)
    confusion = torch.zeros(K, K, dtype=torch.long)
    confusion.index_put_((truth, pred), torch.ones_like(truth), accumulate=True)
    per_class, per_class_n = {}, {}
    for k, label in enumerate(labels):
        n = int((truth == k).sum())
        if n:
            per_class[label] = float(confusion[k, k]) / n
            per_class_n[label] = n
    out = {
        "accuracy": int((pred == truth).sum()) / len(kept),
        "per_class": per_class,
        "per_class_n": per_class_n,
        "n_images": len(kept),
        "n_skipped": len(data.skipped),
        "images_per_s": len(kept) / seconds,
        "unet_rows_per_image": s.unet_rows / len(kept),
        "scorer": loaded.classifier.kind,
        "confusion": confusion.tolist(),
        "labels": labels,
        "predictions": [labels[i] for i in pred.tolist()],
        "files": [data.paths[i] for i in kept],
    }
    if rejector is not None:
        rej = rejector.scores(loaded.bundle, pixels, s)  # (N,)
        kept_mask = rej >= rejector.threshold
        out["reject"] = rejector.describe()
        out["rejected_fraction"] = round(float((~kept_mask).float().mean()), 4)
        out["accuracy_with_reject"] = int(((pred == truth) & kept_mask).sum()) / len(kept)
        out["rejection_scores"] = rej.tolist()
    if s.probs is not None:
        out["ece"] = expected_calibration_error(s.probs, truth)
        out["probs"] = [[round(float(x), 5) for x in row] for row in s.probs]
    if K > 5:
        out["top5"] = int((ranking[:, :5] == truth.view(-1, 1)).any(1).sum()) / len(kept)
    return out


def eval_indices(data: ImageFolder, meta: dict, include_train: bool, limit: int) -> list[int]:
    """All images, minus those the tokens were trained on (when the folder is the same)."""
    train = set()
    runs = [] if include_train else [meta, *meta.get("history", [])]  # + extensions, merges
    for run in runs:
        if Path(run.get("data_root", "")) == data.root.resolve():
            train |= set(run.get("train_files", []))
    chosen, per_class = [], {}
    for i, p in enumerate(data.paths):
        if p in train:
            continue
        per_class[data.labels[i]] = per_class.get(data.labels[i], 0) + 1
        if limit and per_class[data.labels[i]] > limit:
            continue
        chosen.append(i)
    if not chosen:
        raise UserError(
            "no images left to evaluate (all were training images; pass --include-train)"
        )
    return chosen


def plot_confusion(result: dict, path: str | Path, title: str = "") -> None:
    try:
        import matplotlib
    except ImportError as e:  # an extra, not part of the core
        raise UserError("--plot needs matplotlib: pip install 'mcti[plots]'") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mcti.atomic import atomic_write

    cm = torch.tensor(result["confusion"], dtype=torch.float)
    norm = (cm / cm.sum(1, keepdim=True).clamp(min=1)).numpy()
    labels = result["labels"]
    K = len(labels)
    size = max(4.0, 0.45 * K + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(K), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(K), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if K <= 20:
        for i in range(K):
            for j in range(K):
                if cm[i, j] > 0:
                    ax.text(
                        j,
                        i,
                        int(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set_title(
        title
        or f"{result['scorer']} scorer: accuracy {result['accuracy']:.1%} (n={result['n_images']})"
    )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
