"""OUT/checkpoint/state.pt: everything `--resume` needs, one file replaced in one rename.

It holds only tensors and plain values (state dicts, AdamW state, the generator's state, the
step, timings, the accuracy curve) and is read with `torch.load(weights_only=True)`: a file
that would need unpickling of anything else (corrupt, or planted code) is refused in one line
and nothing in it runs.
"""

import pickle
import re
from pathlib import Path

import torch

from mcti.atomic import atomic_write
from mcti.errors import UserError

KEYS = ("clip", "unet", "ema", "opt", "rng", "step", "timing", "curve")


def checkpoint_path(out: str | Path) -> Path:
    return Path(out) / "checkpoint" / "state.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file beside `path`, fsync, rename over it."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """The state dict saved at `path`, on the CPU; a UserError if it is not a complete
    checkpoint of tensors and plain values."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it refers to {found.group(1)}" if found else "corrupt, or it holds objects"
        raise UserError(
            f"cannot resume from {path}: not a checkpoint of tensors and plain values ({what}; "
            "nothing in it was run)"
        ) from e
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror}") from e
    missing = [k for k in KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(
            f"cannot resume from {path}: incomplete checkpoint (no {', '.join(missing)})"
        )
    return state
