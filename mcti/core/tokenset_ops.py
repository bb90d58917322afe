"""Edits of token sets as pure functions on `StoredTokens` (mcti/core/store.py): merge, remove,
rename. Each returns a new set and never touches its inputs; per-class arrays travel with their
class. Every edit is appended to classes.json's `history` (a set trained in one run gets its
run as the first entry), so `mcti tokens info` can say where each class came from.
"""

from mcti.core.store import StoredTokens
from mcti.data.folders import check_labels
from mcti.errors import UserError

# classes.json keys describing the run that trained a set (moved into its history entry)
RUN_KEYS = ("method", "reg", "steps", "settings", "data_root", "train_files", "trainer")


def history(meta: dict, labels: list[str] | None = None) -> list[dict]:
    """The history of a set: its own, or (a set from one `mcti train` run, whose classes are
    `labels`, by default those of classes.json) that run."""
    if isinstance(meta.get("history"), list):
        return [dict(h) for h in meta["history"]]
    run = {k: meta[k] for k in RUN_KEYS if k in meta}
    return [{"op": "train", "labels": list(meta["classes"]) if labels is None else labels, **run}]


def _shown(labels) -> str:
    labels = sorted(labels)
    return ", ".join(repr(x) for x in labels[:10]) + (" ..." if len(labels) > 10 else "")


def base_difference(a: dict, b: dict) -> str | None:
    """How the base models (and token shapes) of two sets' metadata differ, or None."""
    ba, bb = a["base_model"], b["base_model"]
    if ba["fingerprint"] != bb["fingerprint"] or ba["hidden_size"] != bb["hidden_size"]:
        return (
            f"base model {ba['spec']} (fingerprint {ba['fingerprint']}, width "
            f"{ba['hidden_size']}) vs {bb['spec']} (fingerprint {bb['fingerprint']}, width "
            f"{bb['hidden_size']})"
        )
    if a["n_vectors"] != b["n_vectors"]:
        return f"vectors per class {a['n_vectors']} vs {b['n_vectors']}"
    return None


def merge(sets: list[StoredTokens], names: list[str] | None = None) -> StoredTokens:
    """One set holding every class of `sets` (in order); same base model and n_vectors, no label
    in two sets. `names` (e.g. the directories) label the sets in errors and the history."""
    names = names or [f"set {i + 1}" for i in range(len(sets))]
    if len(sets) < 2:
        raise UserError("merge needs at least two token sets")
    first = sets[0]
    for s, name in zip(sets[1:], names[1:], strict=True):
        diff = base_difference(first.meta, s.meta)
        if diff:
            raise UserError(f"cannot merge {names[0]} and {name}: different {diff}")
    seen: dict[str, str] = {}
    collisions: set[str] = set()
    for s, name in zip(sets, names, strict=True):
        for label in s.labels:
            if label in seen:
                collisions.add(label)
            seen.setdefault(label, name)
    if collisions:
        raise UserError(
            f"label(s) in more than one set: {_shown(collisions)}; rename or remove them first "
            "(mcti tokens rename / remove)"
        )
    vectors = {label: v for s in sets for label, v in s.vectors.items()}
    arrays = {label: dict(a) for s in sets for label, a in s.arrays.items()}
    past = [h for s in sets for h in history(s.meta, s.labels)]
    entry = {"op": "merge", "sets": names, "labels": [s.labels for s in sets]}
    return StoredTokens(edited_meta(first.meta, past + [entry]), vectors, arrays)


def remove(s: StoredTokens, labels: list[str]) -> StoredTokens:
    """`s` without the classes `labels` (each must be in `s`; at least one class must stay)."""
    unknown = [x for x in labels if x not in s.vectors]
    if unknown:
        raise UserError(f"label(s) not in the token set: {_shown(unknown)}")
    drop = set(labels)
    if drop >= set(s.labels):
        raise UserError("removing every class would leave an empty token set")
    vectors = {k: v for k, v in s.vectors.items() if k not in drop}
    arrays = {k: dict(a) for k, a in s.arrays.items() if k not in drop}
    entry = {"op": "remove", "labels": [x for x in s.labels if x in drop]}
    return StoredTokens(edited_meta(s.meta, history(s.meta, s.labels) + [entry]), vectors, arrays)


def rename(s: StoredTokens, mapping: dict[str, str]) -> StoredTokens:
    """`s` with labels renamed by `mapping` (old -> new); unknown old labels, new labels that
    collide (with each other or a label kept) and unusable names are refused."""
    unknown = [x for x in mapping if x not in s.vectors]
    if unknown:
        raise UserError(f"label(s) not in the token set: {_shown(unknown)}")
    if any(not new for new in mapping.values()):
        raise UserError("a new label is empty")
    new_labels = [mapping.get(x, x) for x in s.labels]
    taken = [x for x in set(new_labels) if new_labels.count(x) > 1]
    if taken:
        raise UserError(f"renaming would give two classes the label(s) {_shown(taken)}")
    check_labels(new_labels)  # control characters, NFC/NFD look-alikes
    vectors = {mapping.get(k, k): v for k, v in s.vectors.items()}
    arrays = {mapping.get(k, k): dict(a) for k, a in s.arrays.items()}
    entry = {"op": "rename", "map": {k: v for k, v in mapping.items() if k != v}}
    return StoredTokens(edited_meta(s.meta, history(s.meta, s.labels) + [entry]), vectors, arrays)


def edited_meta(meta: dict, past: list[dict]) -> dict:
    """classes.json of an edited set: the base model and shape of `meta`, the history `past`,
    and the run fields (method, settings, training images) of the first run that trained
    classes, which `mcti eval` reads to leave training images out (see `train_files`)."""
    out = {k: v for k, v in meta.items() if k not in RUN_KEYS and k != "history"}
    runs = [h for h in past if h.get("op") in ("train", "extend")]
    if runs:
        first = runs[0]
        out.update({k: first[k] for k in RUN_KEYS if k in first})
        out["train_files"] = train_files(past)
    out["history"] = past
    return out


def train_files(past: list[dict]) -> list[str]:
    """The training images of every run under the first run's data root (the top-level
    `data_root`), in order, each once."""
    runs = [h for h in past if h.get("op") in ("train", "extend")]
    root = runs[0].get("data_root") if runs else None
    files: dict[str, None] = {}
    for h in runs:
        if h.get("data_root") == root:
            files.update(dict.fromkeys(h.get("train_files", [])))
    return list(files)
