"""Resumable DeepSpeed checkpoints that survive any process dying at any moment.

    OUT/checkpoint/latest            the tag of the last complete checkpoint (atomic rename)
    OUT/checkpoint/step-000040/      DeepSpeed's files (every rank writes its part) + mcti.json
    OUT/checkpoint/step-000050/

A save goes to a fresh tag directory; only once every rank has finished its files (DeepSpeed's
closing barrier) and rank 0 has flushed them to disk does `latest` switch to it, by one rename.
The tag it replaces is kept until the next switch, so a crash mid-save, mid-switch or right after
leaves a complete checkpoint behind. A directory for the same tag left by a killed run is
discarded before it is written again.

Loading never unpickles code: DeepSpeed's checkpoint engine calls `torch.load(weights_only=False)`,
so for the length of a load `torch.load` is made to rebuild only tensors, plain containers and
the three plain-data DeepSpeed classes its ZeRO state holds (`safe_deepspeed_classes`). A file
that names anything else (a planted `os.system`, say) stops the run with one line.
"""

import os
import pickle
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from mcti.atomic import atomic_write, atomic_write_json, fsync_dir
from mcti.errors import UserError
from mcti.train.checkpoint import check_same_run, read_json_file

SIDECAR = "mcti.json"


def tag_of(step: int) -> str:
    return f"step-{step:06d}"


class DistCheckpoint:
    def __init__(self, out: str | Path):
        self.dir = Path(out) / "checkpoint"

    def latest(self) -> str | None:
        path = self.dir / "latest"
        if not path.is_file():
            return None
        tag = path.read_text(errors="replace").strip()
        if not re.fullmatch(r"step-\d{6,}", tag) or not (self.dir / tag).is_dir():
            raise UserError(f"checkpoint pointer {path} is corrupt: names {tag[:40]!r}")
        return tag

    def meta(self, tag: str | None = None) -> dict:
        tag = tag or self.latest()
        meta = read_json_file(self.dir / tag / SIDECAR, "checkpoint state")
        for key, kind in (("step", int), ("run", dict)):
            if not isinstance(meta.get(key), kind):
                raise UserError(f"checkpoint state {self.dir / tag / SIDECAR} is corrupt ({key})")
        return meta

    def save(self, engine, step: int, client_state: dict, meta: dict, on_complete=None) -> None:
        """All ranks call this. `on_complete` runs on rank 0 after the files are complete and
        before `latest` switches (the token export goes there)."""
        tag, rank = tag_of(step), dist.get_rank()
        if rank == 0 and (self.dir / tag).exists() and tag != self.latest():
            shutil.rmtree(self.dir / tag)  # a partial save of a killed run
        dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        if rank == 0:  # every rank's files are written (save_checkpoint ends with a barrier)
            atomic_write_json(self.dir / tag / SIDECAR, {"step": step, **meta})
            _fsync_tree(self.dir / tag)
            if on_complete is not None:
                on_complete()
            previous = self.latest()
            atomic_write(self.dir / "latest", lambda tmp: Path(tmp).write_text(tag + "\n"))
            for old in self.dir.glob("step-*"):
                if old.name not in (tag, previous):
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load(self, engine, fingerprint: dict, world_size: int, zero_stage: int) -> tuple[int, dict]:
        """Restore the engine from `latest`; returns (step, client_state)."""
        tag = self.latest()
        meta = self.meta(tag)
        check_same_run(meta["run"], fingerprint, self.dir / tag)
        if not all(isinstance(meta.get(k), int) for k in ("world_size", "zero_stage")):
            raise UserError(f"checkpoint state {self.dir / tag / SIDECAR} is corrupt")
        if meta["zero_stage"] != zero_stage or (
            zero_stage > 0 and meta["world_size"] != world_size
        ):
            raise UserError(
                f"checkpoint {self.dir / tag} was written by {meta['world_size']} rank(s) with ZeRO "
                f"stage {meta['zero_stage']}; resume it with the same (ZeRO 0 may change the world "
                f"size), not {world_size} rank(s) with stage {zero_stage}"
            )
        try:
            with weights_only_torch_load():
                path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if found is None:
                raise UserError(
                    f"checkpoint {self.dir / tag} is corrupt ({_first_line(e)})"
                ) from None
            raise UserError(
                f"checkpoint {self.dir / tag} holds a pickled object that is not plain data "
                f"({found.group(1)}); refusing to load it (it was not written by this trainer)"
            ) from None
        except (EOFError, RuntimeError) as e:
            if "PytorchStreamReader" not in str(e) and not isinstance(e, EOFError):
                raise  # not a file problem (a peer failure, say): the trainer reports it
            raise UserError(f"checkpoint {self.dir / tag} is corrupt ({_first_line(e)})") from None
        if path is None:
            raise UserError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        if not isinstance(client_state.get("rng"), torch.Tensor):
            raise UserError(f"checkpoint {self.dir / tag} is corrupt (no RNG state)")
        return meta["step"], client_state


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def safe_deepspeed_classes() -> list:
    """The non-builtin classes DeepSpeed's ZeRO 1/2 optimizer state pickles; all plain data
    (a scale and flags, an (offset, numel) pair, an int enum), rebuilt without running code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Within the block, every `torch.load` runs with weights_only=True (DeepSpeed passes
    False) and accepts only `safe_deepspeed_classes` beyond torch's own allow-list."""
    real = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(safe_deepspeed_classes()):
            yield
    finally:
        torch.load = real


def _fsync_tree(root: Path) -> None:
    """Flush a checkpoint's files to disk before anything points at them."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(root)
