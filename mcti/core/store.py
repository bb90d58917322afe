"""The token directory: `learned_embeds.safetensors` (diffusers textual-inversion format,
`{token: (n_vectors, d)}`, one entry per class) and `classes.json` (label -> token, base model
fingerprint, method and settings, the training images)."""

import json
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


def save_tokens(
    out: str | Path,
    table: TokenTable,
    labels: list[str],
    bundle: ModelBundle,
    extra: dict | None = None,
) -> None:
    """Write both files atomically (embeddings first; classes.json marks a complete set)."""
    out = Path(out)
    vectors = table.per_class().detach().float().cpu()  # (K, n, d)
    atomic_save_safetensors(
        out / EMBEDS, {token_string(k): vectors[k].clone() for k in range(len(labels))}
    )
    meta = {
        "format": FORMAT,
        "base_model": {
            "spec": bundle.spec,
            "fingerprint": bundle.fingerprint,
            "hidden_size": bundle.hidden_size,
        },
        "n_vectors": table.n_vectors,
        "classes": {label: token_string(k) for k, label in enumerate(labels)},
        **(extra or {}),
    }
    atomic_write_json(out / CLASSES, meta)


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


def load_tokens(
    path: str | Path, bundle: ModelBundle
) -> tuple[TokenSet, TokenTable, list[str], dict]:
    """Load a token directory for `bundle`; refuse tokens trained on another base model."""
    path = Path(path)
    meta = read_meta(path)
    base = meta["base_model"]
    if base["hidden_size"] != bundle.hidden_size:
        raise UserError(
            f"tokens in '{path}' have width {base['hidden_size']} but model '{bundle.spec}' has "
            f"{bundle.hidden_size}: they were trained on another base model ({base['spec']})"
        )
    if base["fingerprint"] != bundle.fingerprint:
        raise UserError(
            f"tokens in '{path}' were trained on base model {base['spec']} (fingerprint "
            f"{base['fingerprint']}), not on '{bundle.spec}' ({bundle.fingerprint})"
        )
    labels = list(meta["classes"])
    try:
        sd = load_file(str(path / EMBEDS))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path / EMBEDS} is corrupt: {e}") from e
    n = meta["n_vectors"]
    rows = []
    for label in labels:
        tok = meta["classes"][label]
        if tok not in sd or tuple(sd[tok].shape) != (n, bundle.hidden_size):
            raise UserError(f"{path / EMBEDS}: entry for {tok} missing or of the wrong shape")
        rows.append(sd[tok].float())
    tokens = TokenSet(bundle, len(labels), n)
    table = TokenTable(len(labels), n, torch.zeros(bundle.hidden_size))
    with torch.no_grad():
        table.vectors.copy_(torch.stack(rows).reshape(-1, bundle.hidden_size))
    table.to(bundle.device).requires_grad_(False)
    return tokens, table, labels, meta


def label_index(labels: list[str], label: str) -> int:
    if label not in labels:
        shown = ", ".join(labels[:10]) + (" ..." if len(labels) > 10 else "")
        raise UserError(f"label '{label}' is not in the token set (labels: {shown})")
    return labels.index(label)
