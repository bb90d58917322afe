"""Checkpoints of `mcti train`, and the "is this the same run?" check every trainer shares.

    OUT/checkpoint/state-000040.safetensors   tokens, AdamW moments, RNG state (tensors only)
    OUT/checkpoint/state.json                 {"step", "adam_step", "run", "tensors"}: written last

A save writes a fresh tensors file, then switches `state.json` to it by one rename (each
rename followed by an fsync of the directory), then deletes older tensors files: a process
killed at any moment leaves a `state.json` that names a complete file. Nothing is unpickled.
(Checkpoints written before `tensors` existed hold their tensors in `state.safetensors`.)
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mcti.atomic import atomic_save_safetensors, atomic_write_json
from mcti.core.tokens import TokenTable
from mcti.errors import UserError

LEGACY_TENSORS = "state.safetensors"


def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a UserError naming the file."""
    try:
        obj = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is corrupt (not valid JSON: {e})") from e
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from e
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} is corrupt (not a JSON object)")
    return obj


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file, or a UserError naming it."""
    try:
        return load_file(str(path))
    except FileNotFoundError as e:
        raise UserError(f"{what} {path} is missing") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{what} {path} is corrupt ({e})") from e


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _changes(key: str, old, new) -> list[str]:
    """What changed in one fingerprint entry, setting by setting: `--lr 0.005 -> 0.01`."""
    try:  # "config" and "trainer" hold the settings as a JSON object
        old_d, new_d = json.loads(old), json.loads(new)
    except (TypeError, json.JSONDecodeError):
        old_d = new_d = None
    if isinstance(old_d, dict) and isinstance(new_d, dict):
        return [
            f"--{k.replace('_', '-')} {_show(old_d.get(k))} -> {_show(new_d.get(k))}"
            for k in sorted(set(old_d) | set(new_d))
            if old_d.get(k) != new_d.get(k)
        ]
    if key == "shots":
        return ["the training images (another --data, --shots or --seed, or files changed)"]
    if key == "base_model":
        return [f"the base model (fingerprint {_show(old)} -> {_show(new)})"]
    return [f"{key} {_show(old)} -> {_show(new)}"]


def check_same_run(stored: dict, current: dict, where: str | Path) -> None:
    """Refuse to continue a checkpoint whose run fingerprint differs, naming each change."""
    if stored == current:
        return
    keys = [k for k in current if stored.get(k) != current[k]]
    keys += [k for k in stored if k not in current]
    changes = [c for k in keys for c in _changes(k, stored.get(k), current.get(k))]
    raise UserError(
        f"checkpoint in {where} is from a different run (differs in: {', '.join(keys)}): "
        f"{'; '.join(changes)}. Resume with the checkpoint's settings, or pick a new --out"
    )


class Checkpoint:
    """The single-process checkpoint in OUT/checkpoint (see the module docstring)."""

    def __init__(self, out: str | Path):
        self.dir = Path(out) / "checkpoint"
        self.state = self.dir / "state.json"

    def exists(self) -> bool:
        return self.state.is_file()

    def save(
        self,
        step: int,
        table: TokenTable,
        opt: torch.optim.Optimizer,
        gen: torch.Generator,
        fingerprint: dict,
    ) -> None:
        st = opt.state[table.vectors] if table.vectors in opt.state else {}
        tensors = {"vectors": table.vectors.detach(), "rng": gen.get_state()}
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[k] = st[k]
        name = f"state-{step:06d}.safetensors"
        atomic_save_safetensors(self.dir / name, tensors)
        adam_step = float(st["step"]) if "step" in st else 0.0
        meta = {"step": step, "adam_step": adam_step, "run": fingerprint, "tensors": name}
        atomic_write_json(self.state, meta)  # the switch: the checkpoint is now `name`
        for old in [*self.dir.glob("state-*.safetensors"), self.dir / LEGACY_TENSORS]:
            if old.name != name:
                old.unlink(missing_ok=True)

    def meta(self) -> dict:
        meta = read_json_file(self.state, "checkpoint state")
        tensors = meta.get("tensors", LEGACY_TENSORS)
        ok = isinstance(tensors, str) and "/" not in tensors
        if not ok or not isinstance(meta.get("step"), int) or not isinstance(meta.get("run"), dict):
            raise UserError(f"checkpoint state {self.state} is corrupt (missing or bad fields)")
        return meta

    def load(
        self, table: TokenTable, opt: torch.optim.Optimizer, gen: torch.Generator, fingerprint: dict
    ) -> int:
        """Restore tokens, optimizer and RNG; returns the step the checkpoint was taken at."""
        meta = self.meta()
        check_same_run(meta["run"], fingerprint, self.dir)
        path = self.dir / meta.get("tensors", LEGACY_TENSORS)
        t = load_tensors(path, "checkpoint tensors")
        if "vectors" not in t or "rng" not in t or t["vectors"].shape != table.vectors.shape:
            raise UserError(f"checkpoint tensors {path} are corrupt (missing or misshapen)")
        try:
            gen.set_state(t["rng"])
        except (RuntimeError, TypeError) as e:
            raise UserError(f"checkpoint tensors {path} are corrupt (RNG state: {e})") from None
        with torch.no_grad():
            table.vectors.copy_(t["vectors"])
        if "exp_avg" in t:
            opt.state[table.vectors] = {
                "step": torch.tensor(meta["adam_step"]),
                "exp_avg": t["exp_avg"].to(table.vectors.device),
                "exp_avg_sq": t["exp_avg_sq"].to(table.vectors.device),
            }
        return meta["step"]
