"""The token directory:

    learned_embeds.safetensors   {token: (n_vectors, d)}, one entry per class (diffusers'
                                 textual-inversion format: loads with load_textual_inversion)
    classes.json                 label -> token, base model fingerprint, method and settings,
                                 the training images, the history of extensions and edits
    class_arrays.safetensors     optional per-class arrays {"<token>/<name>": tensor} (e.g. the
                                 CLIP features of a class's shots): kept out of the embeddings
                                 file so that file stays a plain token file

`StoredTokens` is a set as plain tensors keyed by label (no model needed): `read_tokens` and
`write_tokens` move it to and from disk, and mcti/core/tokenset_ops.py edits it (merge, remove,
rename), per-class arrays travelling with their class. Tokens are written as `<mcti-k>` for the
k-th label, so an edited set is numbered afresh; classes.json says which token is which label.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mcti.atomic import atomic_save_safetensors, atomic_write_json
from mcti.core.model import ModelBundle
from mcti.core.tokens import TokenSet, TokenTable, token_string
from mcti.errors import UserError

FORMAT = "mcti-tokens/1"
EMBEDS = "learned_embeds.safetensors"
CLASSES = "classes.json"
CLASS_ARRAYS = "class_arrays.safetensors"


@dataclass
class StoredTokens:
    """A token set as stored: classes.json's content, and per label its (n, d) vectors and
    named arrays. `meta["classes"]` (label -> token) is rewritten by `write_tokens`."""

    meta: dict
    vectors: dict[str, torch.Tensor]  # label -> (n_vectors, d), in class order
    arrays: dict[str, dict[str, torch.Tensor]] = field(
        default_factory=dict
    )  # label -> name -> array

    @property
    def labels(self) -> list[str]:
        return list(self.vectors)


def write_tokens(out: str | Path, s: StoredTokens) -> None:
    """Write a set atomically file by file: arrays and embeddings first; classes.json, written
    last, marks a complete set (and names each label's token `<mcti-k>`, k its position)."""
    out = Path(out)
    tokens = {label: token_string(k) for k, label in enumerate(s.vectors)}
    arrays = {
        f"{tokens[label]}/{name}": a.detach().float().cpu()
        for label, named in s.arrays.items()
        for name, a in named.items()
    }
    if arrays:
        atomic_save_safetensors(out / CLASS_ARRAYS, arrays)
    else:
        (out / CLASS_ARRAYS).unlink(missing_ok=True)
    atomic_save_safetensors(
        out / EMBEDS, {tokens[label]: v.detach().float().cpu() for label, v in s.vectors.items()}
    )
    atomic_write_json(out / CLASSES, {**s.meta, "classes": tokens})


def save_tokens(
    out: str | Path,
    table: TokenTable,
    labels: list[str],
    bundle: ModelBundle,
    extra: dict | None = None,
    arrays: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write a trained table (class k = labels[k]) for `bundle`; `extra` goes into classes.json,
    `arrays` (label -> name -> tensor) into class_arrays.safetensors."""
    vectors = table.per_class().detach().float().cpu()  # (K, n, d)
    meta = {
        "format": FORMAT,
        "base_model": {
            "spec": bundle.spec,
            "fingerprint": bundle.fingerprint,
            "hidden_size": bundle.hidden_size,
        },
        "n_vectors": table.n_vectors,
        "classes": {},
        **(extra or {}),
    }
    rows = {label: vectors[k].clone() for k, label in enumerate(labels)}
    write_tokens(out, StoredTokens(meta, rows, arrays or {}))


def read_meta(path: str | Path) -> dict:
    """classes.json of a token directory, checked; a corrupt file is a UserError naming it."""
    path = Path(path)
    if not (path / CLASSES).is_file() or not (path / EMBEDS).is_file():
        raise UserError(f"'{path}' is not a token directory (needs {EMBEDS} and {CLASSES})")
    try:
        meta = json.loads((path / CLASSES).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path / CLASSES} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise UserError(f"{path / CLASSES} is corrupt: not a JSON object")
    if meta.get("format") != FORMAT:
        raise UserError(f"{path / CLASSES}: unknown format {meta.get('format')!r}")
    base, classes, n = meta.get("base_model"), meta.get("classes"), meta.get("n_vectors")
    if (
        not isinstance(base, dict)
        or not all(k in base for k in ("spec", "fingerprint", "hidden_size"))
        or not isinstance(classes, dict)
        or not classes
        or not all(isinstance(t, str) for t in classes.values())
        or not isinstance(n, int)
        or n < 1
    ):
        raise UserError(
            f"{path / CLASSES} is corrupt: needs base_model (spec, fingerprint, hidden_size), "
            "a non-empty classes object (label -> token) and n_vectors >= 1"
        )
    return meta


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt: {e}") from e


def read_tokens(path: str | Path) -> StoredTokens:
    """A token directory as plain tensors (no model needed), every entry checked."""
    path = Path(path)
    meta = read_meta(path)
    sd = _load_safetensors(path / EMBEDS)
    shape = (meta["n_vectors"], meta["base_model"]["hidden_size"])
    vectors = {}
    for label, tok in meta["classes"].items():
        if tok not in sd or tuple(sd[tok].shape) != shape:
            raise UserError(f"{path / EMBEDS}: entry for {tok} missing or of the wrong shape")
        vectors[label] = sd[tok].float()
    arrays: dict[str, dict[str, torch.Tensor]] = {}
    if (path / CLASS_ARRAYS).is_file():
        label_of = {tok: label for label, tok in meta["classes"].items()}
        for key, a in _load_safetensors(path / CLASS_ARRAYS).items():
            tok, _, name = key.partition("/")
            if tok in label_of and name:  # an array of no class of the set is dropped
                arrays.setdefault(label_of[tok], {})[name] = a
    return StoredTokens(meta, vectors, arrays)


def check_base_model(meta: dict, bundle: ModelBundle, where: str | Path) -> None:
    """Refuse tokens trained on another base model than `bundle`, naming both."""
    base = meta["base_model"]
    if base["hidden_size"] != bundle.hidden_size:
        raise UserError(
            f"tokens in '{where}' have width {base['hidden_size']} but model '{bundle.spec}' has "
            f"{bundle.hidden_size}: they were trained on another base model ({base['spec']})"
        )
    if base["fingerprint"] != bundle.fingerprint:
        raise UserError(
            f"tokens in '{where}' were trained on base model {base['spec']} (fingerprint "
            f"{base['fingerprint']}), not on '{bundle.spec}' ({bundle.fingerprint})"
        )


def table_of(s: StoredTokens, bundle: ModelBundle) -> tuple[TokenSet, TokenTable]:
    """The TokenSet and (frozen) TokenTable of a stored set, on `bundle`'s device."""
    n = s.meta["n_vectors"]
    tokens = TokenSet(bundle, len(s.vectors), n)
    table = TokenTable(len(s.vectors), n, torch.zeros(bundle.hidden_size))
    with torch.no_grad():
        table.vectors.copy_(torch.stack(list(s.vectors.values())).reshape(-1, bundle.hidden_size))
    table.to(bundle.device).requires_grad_(False)
    return tokens, table


def load_tokens(
    path: str | Path, bundle: ModelBundle
) -> tuple[TokenSet, TokenTable, list[str], dict]:
    """Load a token directory for `bundle`; refuse tokens trained on another base model."""
    meta = read_meta(path)
    check_base_model(meta, bundle, path)  # before reading the tensors: the clearer error
    s = read_tokens(path)
    tokens, table = table_of(s, bundle)
    return tokens, table, s.labels, s.meta


def label_index(labels: list[str], label: str) -> int:
    if label not in labels:
        shown = ", ".join(labels[:10]) + (" ..." if len(labels) > 10 else "")
        raise UserError(f"label '{label}' is not in the token set (labels: {shown})")
    return labels.index(label)
