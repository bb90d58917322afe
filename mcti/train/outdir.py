"""The output directory of a training run: one run at a time, and no silent overwrite.

Shared by `mcti train`, the DeepSpeed trainer (`training/`) and `mcti pretrain`:
- `lock_out_dir(out)`: an exclusive `flock` on OUT/.lock for the whole run, so a second run on
  the same OUT fails in one line instead of interleaving its writes (the kernel drops the lock
  when the process dies, so a killed run never leaves a stale one);
- `refuse_unless_resume(out, has_checkpoint, resume)`: OUT already holds a checkpoint.
"""

import errno
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mcti.errors import UserError

LOCK = ".lock"


def refuse_unless_resume(out: str | Path, has_checkpoint: bool, resume: bool) -> None:
    if has_checkpoint and not resume:
        raise UserError(
            f"'{out}' already holds a checkpoint: pass --resume to continue it, or pick a new --out"
        )


def make_out_dir(out: str | Path) -> bool:
    """Create OUT (and its parents); returns whether it was created. A path that is a file or
    cannot be written is a user error."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file, not a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out '{out}': {e.strerror}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out '{out}' is not writable")
    return created


def out_dir_is_free(out: str | Path) -> None:
    """Fail now if another run holds OUT (a check only: the run itself takes the lock)."""
    if (Path(out) / LOCK).is_file():
        with lock_out_dir(out):
            pass


def _take_lock(fd: int, path: Path) -> None:
    """flock `fd` exclusively, or a UserError naming the pid that holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # e.g. some NFS mounts
            print(
                f"warning: cannot lock {path} ({e.strerror}): a second run is not stopped",
                file=sys.stderr,
            )
            return
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        raise UserError(
            f"'{path.parent}' is in use by another run (pid {holder} holds {path}); wait for it "
            "to end, or pick another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


@contextmanager
def lock_out_dir(out: str | Path) -> Iterator[Path]:
    """Hold OUT/.lock exclusively for the block. If the block fails in a directory this call
    created and nothing but the lock is in it, the directory goes too (no empty leftovers)."""
    out = Path(out)
    created = make_out_dir(out)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _take_lock(fd, out / LOCK)
        try:
            yield out
        except BaseException:
            if created and [p.name for p in out.iterdir()] == [LOCK]:
                shutil.rmtree(out, ignore_errors=True)
            raise
    finally:
        os.close(fd)  # releases the lock
