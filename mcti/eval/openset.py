"""`--reject` and `--unknown` of `mcti eval/classify`: the token set's open-set state (saved by
`mcti train`; fit here from the training shots for sets without one), rejection of scored
images, and the known-vs-unknown metrics and histogram."""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mcti.core import openset
from mcti.core.model import ModelBundle
from mcti.core.scoring import Scores
from mcti.data.folders import IMAGE_EXTS, UNREADABLE
from mcti.data.images import load_image
from mcti.errors import UserError


@dataclass
class Rejector:
    """Labels an image `unknown` when its `score` is below `threshold`."""

    score: str
    threshold: float
    state: openset.OpenSet
    mode: str  # "auto" or "number"

    def scores(self, bundle: ModelBundle, pixels: torch.Tensor, scores: Scores) -> torch.Tensor:
        """(N,) rejection scores of images `pixels` (N, 3, H, W) the classifier scored."""
        feats = None
        if self.score in openset.FEATURE_SCORES:
            feats = bundle.clip_image_features_cpu(pixels)  # (N, P)
        fn = openset.REJECT_SCORES[self.score]
        return fn(openset.Evidence(scores.scores, feats), self.state.reference)

    def describe(self) -> dict:
        return {"score": self.score, "threshold": round(self.threshold, 6), "mode": self.mode}


def shot_reference(
    bundle: ModelBundle, labels: list[str], meta: dict, tokens_dir: str | Path
) -> openset.Reference:
    """CLIP image features of the training shots listed in classes.json (read again from
    `data_root`)."""
    root, files = Path(meta.get("data_root", "")), meta.get("train_files") or []
    pixels, ys, missing = [], [], []
    for rel in files:
        label = Path(rel).parts[0] if Path(rel).parts else ""
        try:
            if label not in labels:
                raise FileNotFoundError(rel)
            pixels.append(load_image(root / rel, bundle.resolution))
            ys.append(labels.index(label))
        except (FileNotFoundError, *UNREADABLE):
            missing.append(rel)
    if not pixels:
        raise UserError(
            f"the open-set state of '{tokens_dir}' is fit on its training images, and none of "
            f"them is readable under '{root}' (moved?); restore them once to fit it"
        )
    if missing:
        print(
            f"warning: {len(missing)} training image(s) not found; fit without them",
            file=sys.stderr,
        )
    feats = bundle.clip_image_features_cpu(torch.stack(pixels))  # (S, P)
    return openset.Reference(feats, torch.tensor(ys), len(labels))


def open_set_state(
    bundle: ModelBundle, labels: list[str], meta: dict, tokens_dir: str | Path
) -> openset.OpenSet:
    """The state `mcti train` saved with the token set, or, for a set trained before it did
    (or with --nproc > 1 or --extend), one fit now from its shots and saved (a read-only token
    directory only costs the refit next time)."""
    state = openset.load(tokens_dir, len(labels))
    if state is not None and (openset.DEFAULT_SCORE in state.loo or not state.loo):
        return state  # (no leave-one-out scores at all: one shot per class)
    state = openset.fit(shot_reference(bundle, labels, meta, tokens_dir))
    print(
        f"note: '{tokens_dir}' had no saved open-set thresholds: fit them on its training shots "
        "(leave-one-out)",
        file=sys.stderr,
    )
    try:
        state.save(tokens_dir)
    except OSError as e:
        print(f"warning: could not save the open-set state in '{tokens_dir}': {e}", file=sys.stderr)
    return state


def make_rejector(
    bundle: ModelBundle,
    labels: list[str],
    meta: dict,
    tokens_dir: str | Path,
    reject: str,
    known_recall: float,
) -> Rejector | None:
    """None for --reject off; else the default score with its threshold."""
    if reject == "off":
        return None
    state = open_set_state(bundle, labels, meta, tokens_dir)
    score = openset.DEFAULT_SCORE
    if reject == "auto":
        return Rejector(score, state.threshold(score, known_recall), state, "auto")
    return Rejector(score, float(reject), state, "number")


def image_tree(root: str | Path) -> list[Path]:
    """Every image file under `root` (any depth), sorted; hidden names are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--unknown folder '{root}' does not exist")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise UserError(f"--unknown folder '{root}' has no image files")
    return files


def load_tree(root: str | Path, size: int) -> tuple[torch.Tensor, int]:
    """(N, 3, H, W) of the readable images under `root`, and the number skipped."""
    images, bad = [], 0
    for p in image_tree(root):
        try:
            images.append(load_image(p, size))
        except UNREADABLE:
            bad += 1
    if not images:
        raise UserError(f"--unknown folder '{root}' has no readable image")
    return torch.stack(images), bad


def open_set_metrics(known: torch.Tensor, unknown: torch.Tensor, threshold: float) -> dict:
    """AUROC, FPR at 95% known recall and the rejected fraction of each side."""
    return {
        "auroc": round(openset.auroc(known, unknown), 4),
        "fpr_at_95": round(openset.fpr_at_recall(known, unknown, 0.95), 4),
        "known_rejected": round(float((known < threshold).float().mean()), 4),
        "unknown_rejected": round(float((unknown < threshold).float().mean()), 4),
    }


def histogram_path(plot: str | Path) -> Path:
    """Where `--plot PLOT --unknown DIR` writes the score histogram: PLOT-openset.png."""
    p = Path(plot)
    return p.with_name(p.stem + "-openset" + (p.suffix or ".png"))


def plot_histogram(
    known: torch.Tensor, unknown: torch.Tensor, threshold: float, score: str, path: str | Path
) -> None:
    try:
        import matplotlib
    except ImportError as e:  # an extra, not part of the core
        raise UserError("--plot needs matplotlib: pip install 'mcti[plots]'") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mcti.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo = float(torch.cat([known, unknown]).min())
    hi = float(torch.cat([known, unknown]).max())
    bins = torch.linspace(lo, hi if hi > lo else lo + 1, 31).tolist()
    ax.hist(known.tolist(), bins=bins, alpha=0.6, label=f"known (n={len(known)})", density=True)
    ax.hist(
        unknown.tolist(), bins=bins, alpha=0.6, label=f"unknown (n={len(unknown)})", density=True
    )
    ax.axvline(threshold, color="black", linestyle="--", label="threshold")
    ax.set_xlabel(f"rejection score ({score}; below the threshold: unknown)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
