"""How `mcti train --nproc N` (and `python -m training --nproc N`) starts its N processes.

Runs `python -m torch.distributed.run --standalone --nproc-per-node N -m training <flags>` and
waits. `training.cli.launch_local` checks the settings first, so a bad batch split fails before
N processes start. torchrun takes the whole job down when one rank dies (it stops the others),
and the trainer's process-group timeout covers a rank that stalls. This module imports nothing
of `training` (the command line imports it, never the reverse).
"""

import os
import subprocess
import sys
from dataclasses import fields

from mcti.errors import UserError
from mcti.settings import TrainArgs


def flags_of(args: TrainArgs) -> list[str]:
    """The command-line flags that reproduce `args` (--nproc is left out: the children are ranks)."""
    out: list[str] = []
    for f in fields(args):
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if f.name == "nproc" or value is None or value is False:
            continue
        out += [flag] if value is True else [flag, str(value)]
    return out


def torchrun_command(args: TrainArgs, nproc: int) -> list[str]:
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


def run_torchrun(args: TrainArgs, nproc: int) -> None:
    """Run `nproc` ranks of `python -m training` on this machine; raises UserError on failure."""
    # The children get their rank variables from torchrun, not from whoever started us.
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    rc = subprocess.run(torchrun_command(args, nproc), env=env).returncode
    if rc != 0:
        raise UserError(
            f"distributed training with {nproc} processes failed (torchrun exit code {rc}); the "
            "failing rank's error is printed above. A complete checkpoint, if one was written, "
            f"is in {args.out}/checkpoint: add --resume to continue"
        )
