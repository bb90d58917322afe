"""`mcti train --extend OLD`: learn tokens for the labels of --data that OLD lacks (or, with
--replace, also retrain those it has), next to OLD's frozen tokens; write one merged set.

The optimizer sees only the trained classes' rows (`Prepared.table`, T classes); the text
encoder reads the whole K-class table (`JoinedTable`): OLD's frozen rows with the trained rows
spliced in, so OLD's classes are candidates (negatives) of the discriminative term and the
gradient reaches the trained rows only. AdamW's weight decay never touches a frozen row, and
the export copies OLD's rows from its file: they stay bit-identical.
Classes are ordered OLD's labels first (a replaced label keeps its place), then the new ones.

Batches are drawn from the shots of all K classes, OLD's training images included, as a run
from scratch draws them, so each trained token gets the updates it would get there. An item of
a frozen class reaches the trained tokens only as their negative under --reg denoise, and with
--reg clip through `ScorerDecision` (mcti/core/objectives.py: every image against the frozen
classes' texts too); the objective skips the others (`Extension.teaches`), so a step costs
about T/K of a scratch step plus that term. Why the term: with frozen tokens the new
classes scored 6.7 points below scratch, and swapping halves between the two sets showed the
frozen old tokens taking the new classes' images, not worse new tokens (benchmarks/RESULTS.md).
"""

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mcti.core.fused import has_fused, load_fused
from mcti.core.model import ModelBundle
from mcti.core.store import StoredTokens, check_base_model, read_tokens
from mcti.core.tokens import TokenTable
from mcti.core.tokenset_ops import RUN_KEYS, edited_meta, history
from mcti.data.coop import open_dataset
from mcti.data.folders import UNREADABLE
from mcti.data.images import load_image
from mcti.errors import UserError
from mcti.settings import TrainArgs


def _shown(labels: list[str]) -> str:
    return ", ".join(repr(x) for x in labels[:10]) + (" ..." if len(labels) > 10 else "")


@dataclass
class ExtendPlan:
    """Which classes an extension trains, and where they go in the merged set."""

    old_path: str
    old: StoredTokens
    labels: list[str]  # the merged set's classes: OLD's, then the added ones
    added: list[str]  # labels of --data that OLD lacks
    replaced: list[str]  # labels of --data that OLD has (--replace)
    trained: list[int]  # merged index of each class of --data, in --data's class order


def plan_extension(cfg: TrainArgs, data_classes: list[str]) -> ExtendPlan:
    """Check an extension against OLD (no model needed) and lay out the merged classes."""
    if Path(cfg.out).resolve() == Path(cfg.extend).resolve():
        raise UserError("--out is the --extend directory: write the extended set to a new --out")
    old = read_tokens(cfg.extend)
    present = [c for c in data_classes if c in old.vectors]
    if present and not cfg.replace:
        raise UserError(
            f"label(s) of --data already in '{cfg.extend}': {_shown(present)}; pass --replace to "
            "retrain them, or leave them out of --data"
        )
    n_old = old.meta["n_vectors"]
    if cfg.n_vectors != n_old:
        raise UserError(
            f"'{cfg.extend}' has {n_old} vector(s) per class but --n-vectors is "
            f"{cfg.n_vectors}: pass --n-vectors {n_old}"
        )
    added = [c for c in data_classes if c not in old.vectors]
    labels = old.labels + added
    trained = [labels.index(c) for c in data_classes]
    return ExtendPlan(cfg.extend, old, labels, added, present, trained)


def check_extension(cfg: TrainArgs) -> ExtendPlan:
    """The checks of an extension that need no model (run before DeepSpeed starts ranks)."""
    return plan_extension(cfg, open_dataset(cfg.data, "train", min_classes=1).classes)


class JoinedTable:
    """The K-class table the text encoder reads during an extension: frozen rows with the
    trained rows spliced in (differentiable in the trained rows only)."""

    def __init__(self, frozen: torch.Tensor, rows: torch.Tensor, trained: TokenTable):
        self.num_classes = len(frozen) // trained.n_vectors
        self.n_vectors = trained.n_vectors
        # (K * n, d): row r of trained.vectors goes to row rows[r]
        self.vectors = frozen.index_copy(0, rows, trained.vectors.to(frozen.dtype))

    def per_class(self) -> torch.Tensor:
        return self.vectors.view(self.num_classes, self.n_vectors, -1)  # (K, n, d)


@dataclass
class Extension:
    """What a training run that extends a set carries besides the trained table."""

    plan: ExtendPlan
    frozen: torch.Tensor  # (K * n, d) OLD's rows (zeros for the added classes), fp32, device
    rows: torch.Tensor  # (T * n,) rows of the trained classes in the merged table
    is_trained: torch.Tensor  # (K,) bool, CPU: the class's token trains

    @classmethod
    def of(cls, plan: ExtendPlan, bundle: ModelBundle) -> "Extension":
        check_base_model(plan.old.meta, bundle, plan.old_path)
        n, d = plan.old.meta["n_vectors"], bundle.hidden_size
        frozen = torch.zeros(len(plan.labels), n, d)
        for k, label in enumerate(plan.old.labels):
            frozen[k] = plan.old.vectors[label]
        rows = torch.tensor([k * n + i for k in plan.trained for i in range(n)])
        is_trained = torch.zeros(len(plan.labels), dtype=torch.bool)
        is_trained[plan.trained] = True
        frozen = frozen.reshape(-1, d).to(bundle.device)
        return cls(plan, frozen, rows.to(bundle.device), is_trained)

    def teaches(self, batch: dict, reg: str | None) -> torch.Tensor:
        """(B,) bool: the batch items whose loss reaches a trained token: those of a trained
        class, and under --reg denoise (whose logits are every candidate's denoising error)
        those with a trained class among their negatives."""
        keep = self.is_trained[batch["labels"]]
        if reg == "denoise" and "negatives" in batch:
            keep = keep | self.is_trained[batch["negatives"]].any(1)
        return keep

    def joined(self, table: TokenTable) -> JoinedTable:
        return JoinedTable(self.frozen, self.rows, table)

    def digest(self) -> str:
        """Identifies OLD's content (a resumed extension must extend the same set)."""
        h = hashlib.sha256(json.dumps(self.plan.old.labels).encode())
        for v in self.plan.old.vectors.values():
            h.update(v.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def merged(self, table: TokenTable, meta: dict) -> StoredTokens:
        """The output set: OLD's frozen rows as read from its file, the trained rows from
        `table`; `meta` describes this run (classes.json fields of a plain run)."""
        plan, old = self.plan, self.plan.old
        trained = table.per_class().detach().float().cpu()  # (T, n, d)
        data_classes = [plan.labels[k] for k in plan.trained]
        new_rows = {label: trained[i].clone() for i, label in enumerate(data_classes)}
        vectors = {label: new_rows.get(label, old.vectors.get(label)) for label in plan.labels}
        arrays = {k: dict(a) for k, a in old.arrays.items() if k not in new_rows}
        run = {k: meta[k] for k in RUN_KEYS if k in meta}
        entry = {
            "op": "extend",
            "from": plan.old_path,
            "labels": plan.added,
            "replaced": plan.replaced,
            **run,
        }
        base = {k: v for k, v in old.meta.items() if k not in RUN_KEYS}
        return StoredTokens(
            edited_meta(base, history(old.meta, old.labels) + [entry]), vectors, arrays
        )


def old_class_images(plan: ExtendPlan, size: int, required: bool) -> dict[int, torch.Tensor]:
    """Merged index -> (S, 3, H, W) training images of OLD's frozen classes, read from the data
    folders OLD's history records. `required` (--reg clip, whose negatives are images): a class
    without a readable image is an error; otherwise a warning, and that class's images are left
    out of the batches (its token is still a negative)."""
    frozen = set(plan.old.labels) - set(plan.replaced)
    found: dict[str, list[torch.Tensor]] = {}
    for h in history(plan.old.meta, plan.old.labels):
        if h.get("op") not in ("train", "extend") or not h.get("data_root"):
            continue
        root = Path(h["data_root"])
        label_of = _label_of_files(h)
        for f in h.get("train_files", []):
            label = label_of.get(f, f.split("/", 1)[0])
            if label not in frozen:
                continue
            try:
                image = load_image(root / f, size)
            except UNREADABLE:
                continue
            found.setdefault(label, []).append(image)
    missing = sorted(frozen - set(found))
    if missing and not required:
        print(
            f"warning: the training images of {_shown(missing)} in '{plan.old_path}' cannot be "
            "read (their data folder moved?): the extension's batches leave those classes out",
            file=sys.stderr,
        )
    elif missing:
        raise UserError(
            f"--reg clip takes its negatives from images, and the training images of "
            f"{_shown(missing)} in '{plan.old_path}' cannot be read (their data folder moved?); "
            "use --reg denoise, whose negatives need only the tokens"
        )
    return {plan.labels.index(label): torch.stack(x) for label, x in found.items()}


def old_fused_cache(plan: ExtendPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
    """OLD's fused-scorer cache (mcti.core.fused) without the replaced classes: features (N, P)
    and their merged class indices (N,); None if OLD has no fused state."""
    if not has_fused(plan.old_path):
        return None
    state = load_fused(plan.old_path, len(plan.old.labels))
    # OLD's classes keep their indices in the merged set (they come first, in OLD's order)
    replaced = [plan.old.labels[k] in plan.replaced for k in state.labels.tolist()]
    keep = ~torch.tensor(replaced, dtype=torch.bool)
    return state.features[keep], state.labels[keep]


def _label_of_files(run: dict) -> dict[str, str]:
    """file -> label of a run's data (a plain folder's files are <label>/<file> anyway)."""
    spec = (run.get("settings") or {}).get("data", "")
    if not spec.startswith("coop:"):
        return {}
    try:
        data = open_dataset(spec, "train", min_classes=1)
    except UserError:
        return {}
    return {p: data.classes[y] for p, y in zip(data.paths, data.labels, strict=True)}
