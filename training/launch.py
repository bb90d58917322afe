"""`mcti train --nproc N` (and `python -m training --nproc N`): the one-machine shortcut.

Runs `python -m torch.distributed.run --standalone --nproc-per-node N -m training <flags>` and
waits. The settings are checked here first, so a bad batch split fails before N processes start.
torchrun takes the whole job down when one rank dies (it stops the others), and the trainer's
process-group timeout covers a rank that stalls.
"""

import os
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

from mcti.errors import UserError
from mcti.settings import TrainArgs
from training.cli import DistTrainArgs, preflight


def flags_of(args: DistTrainArgs) -> list[str]:
    """The command-line flags that reproduce `args` (--nproc is left out: the children are ranks)."""
    out: list[str] = []
    for f in fields(args):
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if f.name == "nproc" or value is None or value is False:
            continue
        out += [flag] if value is True else [flag, str(value)]
    return out


def torchrun_command(args: DistTrainArgs, nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # single node, a free rendezvous port: runs side by side never collide
        f"--nproc-per-node={nproc}",
        "-m",
        "training",
        *flags_of(args),
    ]


def launch_local(args: TrainArgs) -> None:
    """Train with args.nproc data-parallel processes on this machine; raises UserError on failure."""
    dargs = args if isinstance(args, DistTrainArgs) else DistTrainArgs(**asdict(args))
    nproc = dargs.nproc
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, not {nproc}")
    preflight(dargs, nproc)
    if not Path(dargs.data).is_dir():  # every rank would find out after loading the model
        raise UserError(f"data folder '{dargs.data}' does not exist")
    # The children get their rank variables from torchrun, not from whoever started us.
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    rc = subprocess.run(torchrun_command(dargs, nproc), env=env).returncode
    if rc != 0:
        raise UserError(
            f"distributed training with {nproc} processes failed (torchrun exit code {rc}); the "
            "failing rank's error is printed above. A complete checkpoint, if one was written, "
            f"is in {dargs.out}/checkpoint: add --resume to continue"
        )
