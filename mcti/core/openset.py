"""Open set: a score of how well the known classes explain an image, and a threshold under
which the image is `unknown` ("none of these").

A rejection score is a function `(Evidence, Reference) -> (N,)`, higher = more like a known
class. `Evidence` is what scoring an image yields (the scorer's per-class scores, the CLIP image
feature); `Reference` is what is known of the classes (the CLIP image features of the token
set's training shots). Candidates (REJECT_SCORES):
- `msp`, `margin`: max softmax / top1-top2 margin of the scorer's scores, standardised per
  image (scale-free across scorers);
- `ncm`: cosine to the nearest class mean of the shot features; `knn`: to the nearest shot;
- `mahalanobis`: minus the smallest Mahalanobis distance to a class mean, with one shared,
  shrunk covariance of the shots (the classes' own spread); `relative_mahalanobis` (default):
  the same relative to one Gaussian of all shots.
A calibrated fused probability can be added as one more entry of REJECT_SCORES.

`auto` thresholds come from the training shots alone: each shot is scored against a reference
built without it (leave-one-out), and the threshold is the (1 - known_recall) quantile of those
scores. `mcti train` fits them at the end and saves them with the token set (TOKENS/openset.json:
the leave-one-out scores, so any --known-recall reuses them, and the thresholds at the default
recall for the reader; the reference arrays in TOKENS/openset.safetensors).
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mcti.atomic import atomic_save_safetensors, atomic_write_json
from mcti.core.model import ModelBundle
from mcti.errors import UserError

FORMAT = "mcti-openset/1"
JSON_FILE = "openset.json"
ARRAYS_FILE = "openset.safetensors"
DEFAULT_SCORE = "relative_mahalanobis"  # best mean AUROC in benchmarks/openset.py
DEFAULT_KNOWN_RECALL = 0.95  # the thresholds written to openset.json (--known-recall's default)
SHRINK = 0.5  # weight of the isotropic part of the shared covariance (few shots, P dims)
UNKNOWN = "unknown"
NO_LEAVE_ONE_OUT = (
    "--reject auto needs at least one class with 2 or more training shots (leave-one-out); "
    "pass --reject NUMBER"
)


@dataclass
class Evidence:
    """What scoring N images gave: scores (N, K) of the scorer (higher better, -inf where a
    class was not scored) and the CLIP image features (N, P), L2-normalised, or None."""

    scores: torch.Tensor | None = None
    features: torch.Tensor | None = None


@dataclass
class Reference:
    """The known classes, from the training shots' CLIP features (S, P) and labels (S,)."""

    features: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def means(self) -> torch.Tensor:
        """(K, P) L2-normalised class means (a class without shots gets a zero row)."""
        K, P = self.num_classes, self.features.shape[1]
        sums = torch.zeros(K, P).index_add_(0, self.labels, self.features)
        return torch.nn.functional.normalize(sums, dim=-1)

    def raw_means(self) -> torch.Tensor:
        """(K, P) class means (a class without shots gets a zero row)."""
        counts = torch.bincount(self.labels, minlength=self.num_classes).clamp(min=1)
        sums = torch.zeros(self.num_classes, self.features.shape[1])
        return sums.index_add_(0, self.labels, self.features) / counts.unsqueeze(1)

    def precision(self) -> torch.Tensor:
        """(P, P) inverse of the shared within-class covariance (shrunk)."""
        return shrunk_precision(self.features - self.raw_means()[self.labels])

    def without(self, i: int) -> "Reference":
        keep = torch.arange(len(self.labels)) != i
        return Reference(self.features[keep], self.labels[keep], self.num_classes)


def shrunk_precision(centred: torch.Tensor) -> torch.Tensor:
    """(S, P) centred features -> (P, P) inverse of their covariance shrunk toward its mean
    variance (few shots in P dimensions: the raw covariance is singular)."""
    c = centred.double()
    cov = c.T @ c / max(1, len(c))
    iso = cov.diagonal().mean().clamp(min=1e-8)
    cov = (1 - SHRINK) * cov + SHRINK * iso * torch.eye(len(cov), dtype=cov.dtype)
    return torch.linalg.inv(cov).float()


def _need(x: torch.Tensor | None, what: str) -> torch.Tensor:
    if x is None:
        raise UserError(f"this rejection score needs {what}")
    return x


def _standardised(scores: torch.Tensor) -> torch.Tensor:
    """(N, K) scores -> per-image z-scores over the scored classes (-inf stays -inf)."""
    finite = torch.isfinite(scores)
    s = torch.where(finite, scores, 0.0).double()
    n = finite.sum(1, keepdim=True).clamp(min=1)
    mean = s.sum(1, keepdim=True) / n
    var = (torch.where(finite, s - mean, 0.0) ** 2).sum(1, keepdim=True) / n
    z = (s - mean) / var.sqrt().clamp(min=1e-12)
    return torch.where(finite, z, -torch.inf).float()


def msp(ev: Evidence, ref: Reference) -> torch.Tensor:
    z = _standardised(_need(ev.scores, "the scorer's scores"))
    return z.softmax(1).max(1).values


def margin(ev: Evidence, ref: Reference) -> torch.Tensor:
    z = _standardised(_need(ev.scores, "the scorer's scores"))
    if z.shape[1] < 2:
        return torch.zeros(len(z))
    top = z.topk(2, dim=1).values
    return torch.where(torch.isfinite(top[:, 1]), top[:, 0] - top[:, 1], top[:, 0])


def ncm(ev: Evidence, ref: Reference) -> torch.Tensor:
    f = _need(ev.features, "CLIP image features")
    return (f @ ref.means().T).max(1).values


def knn(ev: Evidence, ref: Reference) -> torch.Tensor:
    f = _need(ev.features, "CLIP image features")
    return (f @ ref.features.T).max(1).values


def mahalanobis(ev: Evidence, ref: Reference) -> torch.Tensor:
    f = _need(ev.features, "CLIP image features")  # (N, P)
    present = torch.bincount(ref.labels, minlength=ref.num_classes) > 0
    d = f.unsqueeze(1) - ref.raw_means()[present].unsqueeze(0)  # (N, K', P)
    dist = torch.einsum("nkp,pq,nkq->nk", d, ref.precision(), d)
    return -dist.min(1).values


def relative_mahalanobis(ev: Evidence, ref: Reference) -> torch.Tensor:
    """`mahalanobis` minus the same of one Gaussian fit to all shots (Ren et al. 2021): an
    image typical of the whole domain but of none of its classes scores low."""
    f = _need(ev.features, "CLIP image features")  # (N, P)
    centre = ref.features.mean(0)
    d = f - centre  # (N, P)
    background = torch.einsum("np,pq,nq->n", d, shrunk_precision(ref.features - centre), d)
    return mahalanobis(ev, ref) + background


REJECT_SCORES: dict[str, Callable[[Evidence, Reference], torch.Tensor]] = {
    "msp": msp,
    "margin": margin,
    "ncm": ncm,
    "knn": knn,
    "mahalanobis": mahalanobis,
    "relative_mahalanobis": relative_mahalanobis,
}
FEATURE_SCORES = {
    "ncm",
    "knn",
    "mahalanobis",
    "relative_mahalanobis",
}  # exact leave-one-out; the others use the shots


def leave_one_out(
    score: str, ref: Reference, shot_scores: torch.Tensor | None = None
) -> torch.Tensor:
    """(S,) the rejection score of each training shot. Feature scores: against the reference
    without that shot (a shot of a class with no other shot is skipped: nothing is left to
    compare it with). Scorer scores (`shot_scores` (S, K)): the shots' own scores, as is (the
    tokens were fit on them, so this is optimistic)."""
    fn = REJECT_SCORES[score]
    if score not in FEATURE_SCORES:
        return fn(Evidence(scores=_need(shot_scores, "the shots' scores")), ref)
    counts = torch.bincount(ref.labels, minlength=ref.num_classes)
    out = [
        fn(Evidence(features=ref.features[i : i + 1]), ref.without(i))[0]
        for i in range(len(ref.labels))
        if counts[ref.labels[i]] >= 2
    ]
    if not out:
        raise UserError(NO_LEAVE_ONE_OUT)
    return torch.stack(out)


def threshold_for(loo: torch.Tensor, known_recall: float) -> float:
    """The score above which a fraction `known_recall` of the leave-one-out scores lie."""
    return float(torch.quantile(loo.double(), 1 - known_recall))


# --- metrics: known images positive, unknown negative ---


def auroc(known: torch.Tensor, unknown: torch.Tensor) -> float:
    """P(score of a known image > score of an unknown one), ties counted half."""
    k, u = known.double().view(-1, 1), unknown.double().view(1, -1)
    return float(((k > u).double() + 0.5 * (k == u).double()).mean())


def fpr_at_recall(known: torch.Tensor, unknown: torch.Tensor, recall: float = 0.95) -> float:
    """Fraction of unknown images accepted at the threshold that accepts `recall` of the known."""
    t = threshold_for(known, recall)
    return float((unknown >= t).double().mean())


# --- the saved state of a token set ---


@dataclass
class OpenSet:
    """The reference and leave-one-out scores of one token set (TOKENS/openset.*)."""

    reference: Reference
    loo: dict[str, list[float]]  # score name -> leave-one-out scores of the shots

    def threshold(self, score: str, known_recall: float) -> float:
        if not self.loo:  # one shot per class: nothing to leave out
            raise UserError(NO_LEAVE_ONE_OUT)
        return threshold_for(torch.tensor(self.loo[score]), known_recall)

    def save(self, tokens_dir: str | Path) -> None:
        """Arrays first; openset.json marks a complete state."""
        d = Path(tokens_dir)
        ref = self.reference
        atomic_save_safetensors(
            d / ARRAYS_FILE,
            {"features": ref.features.contiguous(), "labels": ref.labels.contiguous()},
        )
        thresholds = {s: round(self.threshold(s, DEFAULT_KNOWN_RECALL), 6) for s in self.loo}
        meta = {
            "format": FORMAT,
            "num_classes": ref.num_classes,
            "known_recall": DEFAULT_KNOWN_RECALL,
            "thresholds": thresholds,  # for the reader: `threshold` derives any from `loo`
            "loo": self.loo,
        }
        atomic_write_json(d / JSON_FILE, meta)


def fit_on_shots(
    bundle: ModelBundle, pixels: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> OpenSet:
    """The state of a token set from its training shots (S, 3, H, W) and their classes (S,),
    as `mcti train` saves it."""
    return fit(Reference(bundle.clip_image_features_cpu(pixels), labels.cpu(), num_classes))


def fit(ref: Reference, scores: list[str] | None = None) -> OpenSet:
    """Leave-one-out scores of the feature scores (or `scores`) on the reference's shots; none
    when no class has 2 shots (the reference still serves `--reject NUMBER`)."""
    names = scores or sorted(FEATURE_SCORES)
    if int(torch.bincount(ref.labels, minlength=ref.num_classes).max()) < 2:
        return OpenSet(ref, {})
    return OpenSet(ref, {s: [round(float(x), 6) for x in leave_one_out(s, ref)] for s in names})


def load(tokens_dir: str | Path, num_classes: int) -> OpenSet | None:
    """The saved state, or None if there is none; a corrupt one is a UserError naming it."""
    d = Path(tokens_dir)
    if not (d / JSON_FILE).is_file():
        return None
    try:
        meta = json.loads((d / JSON_FILE).read_bytes())
        arrays = load_file(str(d / ARRAYS_FILE))
        ref = Reference(arrays["features"].float(), arrays["labels"].long(), meta["num_classes"])
        loo = {str(k): [float(x) for x in v] for k, v in meta["loo"].items()}
        ok = meta.get("format") == FORMAT and ref.num_classes == num_classes
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        SafetensorError,
    ) as e:
        raise UserError(f"{d / JSON_FILE} is corrupt ({e}); delete it to refit") from e
    if not ok or len(ref.features) != len(ref.labels):
        raise UserError(f"{d / JSON_FILE} does not match this token set; delete it to refit")
    return OpenSet(ref, loo)


def parse_reject(value: str) -> str | float:
    """'off', 'auto' or a number (the threshold itself)."""
    if value in ("off", "auto"):
        return value
    return float(value)
