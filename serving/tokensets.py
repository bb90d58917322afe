"""The token sets a classifier replica serves, and how a new list of them replaces the old one.

The sets are the classifier deployment's Serve `user_config`:

    {"tokens": {id: dir, ...}, "versions": {id: str, ...}}   # the first id is the default set

Serve calls the replica's `reconfigure` with it when the replica starts, and again on running
replicas when only the user_config changes (`serve deploy`, a KubeRay serveConfigV2 edit, SIGHUP
to `mcti serve`): the base model stays loaded. `load_sets` builds the new list next to the old
one, reusing every set whose directory and version are unchanged (its conditioning is not
computed again); the replica then swaps one reference, so a batch sees the old list or the new
one, never a mix. All or nothing: one set that fails to load leaves the whole old list serving.
`versions` is optional: an opaque string per set that makes a directory rewritten in place load
again (`mcti serve` puts `dir_version` there); a new directory per set needs none.
"""

import hashlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from mcti.errors import UserError


@dataclass(frozen=True)
class TokenSets:
    """One immutable list of served sets: replaced as a whole, never edited."""

    sets: dict[str, dict] = field(default_factory=dict)
    """id -> {tokens, table, labels, meta, scorers, path, version}; the first id is the default."""
    version: str = ""
    """Names this list (a hash of its ids, directories and versions); equal on every replica
    that applied the same user_config."""

    @property
    def default(self) -> str | None:
        return next(iter(self.sets), None)


def token_config(tokens: dict[str, str], versions: dict[str, str] | None = None) -> dict:
    """The classifier's user_config for these sets."""
    cfg: dict = {"tokens": dict(tokens)}
    if versions:
        cfg["versions"] = dict(versions)
    return cfg


def dir_version(path: str | Path) -> str:
    """Changes when a file of the directory does (names, sizes, modification times; cheap: no
    file is read). A missing directory has its own version, so it loads, and fails, again."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def sets_version(tokens: dict[str, str], versions: dict[str, str]) -> str:
    """The name of a list of sets (TokenSets.version): equal for equal user_configs."""
    names = json.dumps([[k, p, versions.get(k, "")] for k, p in tokens.items()])
    return hashlib.sha256(names.encode()).hexdigest()[:12]


def requested_version(user_config) -> str:
    """sets_version of a user_config, or "invalid"."""
    try:
        return sets_version(*parse_user_config(user_config))
    except UserError:
        return "invalid"


def parse_user_config(user_config: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(tokens, versions) of a user_config, or a UserError naming what is wrong."""
    if not isinstance(user_config, dict):
        raise UserError("the classifier's user_config must be a mapping with 'tokens'")
    unknown = set(user_config) - {"tokens", "versions"}
    if unknown:
        raise UserError(f"user_config: unknown keys {sorted(unknown)} (known: tokens, versions)")
    tokens, versions = user_config.get("tokens"), user_config.get("versions") or {}
    if not isinstance(tokens, dict) or not tokens:
        raise UserError("user_config.tokens must be a non-empty mapping {id: token directory}")
    for name, d in (("tokens", tokens), ("versions", versions)):
        if not isinstance(d, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in d.items()
        ):
            raise UserError(f"user_config.{name} must map ids to non-empty strings")
    return dict(tokens), dict(versions)


def load_sets(
    user_config: dict,
    old: TokenSets,
    bundle,
    settings,
    scorers: list[str],
    model_turn: Callable[[], AbstractContextManager],
) -> TokenSets:
    """The sets of `user_config`, reusing those of `old` with the same directory and version.
    Raises UserError (nothing changes) when any set cannot be loaded. `model_turn()` is held
    while the new conditioning is computed (encoding swaps the text encoder's embedding)."""
    from mcti.core.fused import load_fused
    from mcti.core.scoring import Classifier
    from mcti.core.store import load_tokens

    tokens, versions = parse_user_config(user_config)
    sets: dict[str, dict] = {}
    for key, path in tokens.items():
        version = versions.get(key, "")
        prev = old.sets.get(key)
        if prev is not None and (prev["path"], prev["version"]) == (path, version):
            sets[key] = prev
            continue
        try:
            tok, table, labels, meta = load_tokens(path, bundle)
            fused = load_fused(path, len(labels)) if "fused" in scorers else None
            with model_turn():  # conditioning (K, L, d) and CLIP text features, once per set
                built = Classifier.for_scorers(bundle, tok, table, settings, scorers, fused)
        except UserError as e:
            raise UserError(f"token set '{key}': {e}") from None
        except Exception as e:  # a corrupt file may fail anywhere in the readers
            raise UserError(f"token set '{key}' ({path}): {type(e).__name__}: {e}") from None
        sets[key] = dict(
            tokens=tok,
            table=table,
            labels=labels,
            meta=meta,
            scorers=built,
            path=path,
            version=version,
        )
    return TokenSets(sets, sets_version(tokens, versions))
