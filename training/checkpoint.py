"""Resumable DeepSpeed checkpoints that survive any process dying at any moment.

    OUT/checkpoint/latest            the tag of the last complete checkpoint (atomic rename)
    OUT/checkpoint/step-000040/      DeepSpeed's files (every rank writes its part) + mcti.json
    OUT/checkpoint/step-000050/

A save goes to a fresh tag directory; only once every rank has finished its files (DeepSpeed's
closing barrier) and rank 0 has flushed them to disk does `latest` switch to it, by one rename.
The tag it replaces is kept until the next switch, so a crash mid-save, mid-switch or right after
leaves a complete checkpoint behind. A directory for the same tag left by a killed run is
discarded before it is written again.
"""

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from mcti.atomic import atomic_write, atomic_write_json
from mcti.errors import UserError

SIDECAR = "mcti.json"


def tag_of(step: int) -> str:
    return f"step-{step:06d}"


class DistCheckpoint:
    def __init__(self, out: str | Path):
        self.dir = Path(out) / "checkpoint"

    def latest(self) -> str | None:
        path = self.dir / "latest"
        return path.read_text().strip() if path.is_file() else None

    def meta(self, tag: str | None = None) -> dict:
        tag = tag or self.latest()
        return json.loads((self.dir / tag / SIDECAR).read_text())

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
        if meta["run"] != fingerprint:
            diff = [k for k in fingerprint if meta["run"].get(k) != fingerprint[k]]
            raise UserError(
                f"checkpoint {self.dir / tag} is from a different run (differs in: {', '.join(diff)})"
            )
        if meta["zero_stage"] != zero_stage or (
            zero_stage > 0 and meta["world_size"] != world_size
        ):
            raise UserError(
                f"checkpoint {self.dir / tag} was written by {meta['world_size']} rank(s) with ZeRO "
                f"stage {meta['zero_stage']}; resume it with the same (ZeRO 0 may change the world "
                f"size), not {world_size} rank(s) with stage {zero_stage}"
            )
        path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise UserError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        return meta["step"], client_state


def _fsync_tree(root: Path) -> None:
    """Flush a checkpoint's files to disk before anything points at them."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
