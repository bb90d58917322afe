"""`mcti tokens info|list|merge|remove|rename`: inspect and edit token directories.

Edits are pure functions (mcti/core/tokenset_ops.py) between a read and an atomic write
(mcti/core/store.py); the output must be a new or empty directory, so an existing set is never
half-overwritten, and the inputs are never touched.
"""

import json
from pathlib import Path

from mcti.core.fused import edited_fused, has_fused, load_fused, save_fused
from mcti.core.store import StoredTokens, read_tokens, write_tokens
from mcti.core.tokenset_ops import history, merge, remove, rename
from mcti.errors import UserError
from mcti.settings import (
    TokensInfoArgs,
    TokensListArgs,
    TokensMergeArgs,
    TokensRemoveArgs,
    TokensRenameArgs,
)


def run(a) -> None:
    {
        TokensInfoArgs: info,
        TokensListArgs: list_labels,
        TokensMergeArgs: merge_sets,
        TokensRemoveArgs: remove_labels,
        TokensRenameArgs: rename_labels,
    }[type(a)](a)


def summary(s: StoredTokens, path: str) -> dict:
    """What `info` shows: the set's shape, base model, how it was trained, its edits."""
    meta, past = s.meta, history(s.meta, s.labels)
    return {
        "path": path,
        "classes": len(s.labels),
        "n_vectors": meta["n_vectors"],
        "base_model": meta["base_model"],
        "method": meta.get("method"),
        "reg": meta.get("reg"),
        "steps": meta.get("steps"),
        "settings": meta.get("settings"),
        "data_root": meta.get("data_root"),
        "train_files": len(meta.get("train_files", [])),
        "class_arrays": sorted({name for a in s.arrays.values() for name in a}),
        "history": [
            {k: v for k, v in h.items() if k not in ("settings", "train_files", "trainer")}
            | ({"n_train_files": len(h["train_files"])} if "train_files" in h else {})
            for h in past
        ],
    }


def _show_labels(labels: list[str], n: int = 8) -> str:
    return ", ".join(labels[:n]) + (f" ... ({len(labels)})" if len(labels) > n else "")


def info(a: TokensInfoArgs) -> None:
    out = summary(read_tokens(a.tokens), a.tokens)
    if a.json:
        print(json.dumps(out, indent=2))
        return
    base = out["base_model"]
    print(f"token set   {a.tokens}")
    print(f"classes     {out['classes']} ({out['n_vectors']} vector(s) per class)")
    fp, width = base["fingerprint"], base["hidden_size"]
    print(f"base model  {base['spec']} (fingerprint {fp}, width {width})")
    print(f"method      {out['method']}" + (f", reg {out['reg']}" if out["reg"] else ""))
    print(f"steps       {out['steps']}")
    settings = out["settings"] or {}
    keys = ("shots", "lr", "batch_size", "negatives", "gamma", "tau", "seed", "data", "extend")
    shown = [f"{k}={settings[k]}" for k in keys if settings.get(k) not in (None, "")]
    print(f"settings    {' '.join(shown) or '-'}")
    print(f"shots       {out['train_files']} training image(s) under {out['data_root']}")
    if out["class_arrays"]:
        print(f"arrays      {', '.join(out['class_arrays'])} (per class)")
    for i, h in enumerate(out["history"], 1):
        labels = h.get("labels", [])
        if h["op"] == "merge":  # one list per merged set
            labels = [x for part in labels for x in part]
        what = {
            "train": "trained",
            "extend": "extended: learned",
            "merge": "merged",
            "remove": "removed",
        }.get(h["op"])
        if h["op"] == "rename":
            line = "renamed " + ", ".join(f"{k}->{v}" for k, v in h.get("map", {}).items())
        else:
            line = f"{what} {_show_labels(labels)}"
            if h["op"] == "extend" and h.get("replaced"):
                line += f" (retrained {_show_labels(h['replaced'])})"
            if h["op"] == "merge":
                line += f" from {', '.join(h.get('sets', []))}"
            if h["op"] in ("train", "extend"):
                line += f" ({h.get('n_train_files', 0)} images, {h.get('steps')} steps)"
        print(f"history {i:<3} {line}")


def list_labels(a: TokensListArgs) -> None:
    labels = read_tokens(a.tokens).labels
    print(json.dumps(labels) if a.json else "\n".join(labels))


def _check_new_out(out: str, inputs: list[str]) -> None:
    """The output must be a new or empty directory (not one of the inputs)."""
    p = Path(out)
    if any(p.resolve() == Path(i).resolve() for i in inputs):
        raise UserError(f"--out '{out}' is an input; write the result to a new directory")
    if p.is_dir() and any(p.iterdir()):
        raise UserError(f"--out '{out}' is not empty; pick a new directory")


def _write(out: str, s: StoredTokens, inputs: list[tuple[str, StoredTokens]], renamed=None) -> None:
    """Write the edited set, and the inputs' fused-scorer caches with their classes when every
    input has one (read before anything is written: a corrupt one writes nothing)."""
    fused = None
    if all(has_fused(path) for path, _ in inputs):
        renamed = renamed or {}
        parts = [
            (load_fused(path, len(t.labels)), [renamed.get(x, x) for x in t.labels])
            for path, t in inputs
        ]
        fused = edited_fused(parts, s.labels)
    write_tokens(out, s)
    if fused is not None:
        save_fused(out, fused)
    print(f"wrote {len(s.labels)} class tokens to {out}")


def _items(values: list[str], known: set[str]) -> list[str]:
    """Arguments given as `x,y` or `x y`; an argument that is itself a known label (one with a
    comma in it) is kept whole."""
    return [x for v in values for x in ([v] if v in known else v.split(",")) if x]


def merge_sets(a: TokensMergeArgs) -> None:
    if len(a.tokens) < 2:
        raise UserError("merge needs at least two token directories")
    _check_new_out(a.out, a.tokens)
    sets = [(t, read_tokens(t)) for t in a.tokens]
    _write(a.out, merge([s for _, s in sets], list(a.tokens)), sets)


def remove_labels(a: TokensRemoveArgs) -> None:
    _check_new_out(a.out, [a.tokens])
    s = read_tokens(a.tokens)
    labels = _items(a.labels, set(s.labels))
    if not labels:
        raise UserError("--labels names no label")
    _write(a.out, remove(s, labels), [(a.tokens, s)])


def rename_labels(a: TokensRenameArgs) -> None:
    _check_new_out(a.out, [a.tokens])
    s = read_tokens(a.tokens)
    mapping: dict[str, str] = {}
    for item in _items(a.mapping, set()):
        old, sep, new = item.partition("=")
        if not sep or not old:
            raise UserError(f"--map takes OLD=NEW, not {item!r}")
        if old in mapping:
            raise UserError(f"--map renames {old!r} twice")
        mapping[old] = new
    if not mapping:
        raise UserError("--map names no label")
    _write(a.out, rename(s, mapping), [(a.tokens, s)], mapping)
