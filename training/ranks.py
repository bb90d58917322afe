"""The process group of a data-parallel run: how it starts, and how a lost rank is reported.

`init_distributed` carries the DeepSpeed and torch patches a CPU/gloo run needs. Every rank
records which process it is (`ProcessTable`), so that when a collective fails the survivors
can say which rank is gone: a rank on this machine whose process has exited (or is a zombie)
died; otherwise one of the others stalled past --timeout-s or died on another machine.
"""

import logging
import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mcti.core.model import resolve_device
from mcti.errors import UserError
from training.cli import DistTrainArgs
from training.ds_config import Resolved


def skip_shm_comm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce extension at start (~40 s,
    and again in every fresh container). It only serves `inference_all_reduce`, which training
    never calls; gloo does the gradient all-reduce. Tell DeepSpeed it is unavailable."""
    import importlib

    comm = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` is torch
    if hasattr(comm, "build_shm_op"):
        comm.build_shm_op = lambda: None


def groups_time_out_after(seconds: float) -> None:
    """torch gives a group created without a timeout its own default (30 min for gloo, 10 for
    NCCL), and DeepSpeed creates its data-parallel groups that way: a stalled rank would hold
    the others for half an hour. Make `timeout_s` the default for every group."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timedelta(seconds=seconds)
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timedelta(seconds=seconds)


def single_process_env() -> None:
    """`python -m training` without a launcher: a world of one (DeepSpeed reads the env)."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def init_distributed(args: DistTrainArgs, resolved: Resolved) -> tuple[int, int, torch.device]:
    """Process group (gloo on CPU, NCCL on CUDA) with `timeout_s`; returns rank, world, device."""
    single_process_env()
    local, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"])
    device = resolve_device(args.device)
    if device.type == "cuda":  # one GPU per rank; --device cuda:N only picks it for one process
        index = device.index if device.index is not None and world == 1 else local
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        # NCCL: abort on a collective timeout or error instead of blocking forever
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    elif resolved.precision != "fp32":
        raise UserError(
            f"{resolved.path} enables {resolved.precision}, which needs CUDA; on CPU use a *_fp32 config"
        )
    os.environ["DS_ACCELERATOR"] = device.type  # read when deepspeed is first imported
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls a c10d function that torch has deprecated: not the user's concern
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    skip_shm_comm_build()
    groups_time_out_after(args.timeout_s)
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        timeout=timedelta(seconds=args.timeout_s),
        auto_mpi_discovery=False,
        verbose=False,
    )
    return dist.get_rank(), dist.get_world_size(), device


@dataclass
class ProcessTable:
    """(host, pid) of every rank, gathered once at start (a collective)."""

    rank: int
    procs: list[tuple[str, int]]

    @classmethod
    def gather(cls) -> "ProcessTable":
        procs: list = [None] * dist.get_world_size()
        dist.all_gather_object(procs, (socket.gethostname(), os.getpid()))
        return cls(dist.get_rank(), [(str(h), int(p)) for h, p in procs])

    def dead_ranks(self) -> list[int]:
        """Other ranks on this machine whose process is gone."""
        host = socket.gethostname()
        return [
            r
            for r, (h, pid) in enumerate(self.procs)
            if r != self.rank and h == host and not process_alive(pid)
        ]

    def others(self) -> list[int]:
        return [r for r in range(len(self.procs)) if r != self.rank]


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def is_peer_failure(e: BaseException) -> bool:
    """Errors of a collective whose peer died or stalled (gloo/NCCL), as opposed to our bugs."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text
        for s in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Timed out")
    )


def peer_failure_line(e: BaseException, table: ProcessTable, timeout_s: float, out: str) -> str:
    """The one line a surviving rank prints: which rank is lost, and that --resume continues."""
    world, dead = len(table.procs), table.dead_ranks()
    if dead:
        lost = f"lost rank {', '.join(map(str, dead))} (its process exited)"
    else:
        lost = (
            f"lost one of ranks {', '.join(map(str, table.others()))} (none died on this machine)"
        )
    cause = str(e).splitlines()[0] if str(e) else type(e).__name__
    return (
        f"training: error (rank {table.rank} of {world}): {lost}: another rank died, or stalled "
        f"for longer than --timeout-s {timeout_s:g}, and a collective failed. The last complete "
        f"checkpoint in {out}/checkpoint stays loadable: rerun with --resume. Cause: {cause}"
    )
