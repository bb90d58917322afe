"""How a data-parallel run starts: `main` (`python -m training`) runs one rank under a launcher,
or, given `--nproc N` and no launcher, becomes one; `launch_local` is also `mcti train --nproc N`.

`launch_local` runs `python -m torch.distributed.run --standalone --nproc-per-node N -m training
<flags>` and waits. The settings are checked first (`training.cli.preflight`), so a bad batch
split fails before N processes start. torchrun takes the whole job down when one rank dies (it
stops the others), and the trainer's process-group timeout covers a rank that stalls.

Imports point one way: launch -> cli (arguments, checks) and launch -> trainer (lazily).
"""

import os
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

from mcti.errors import UserError
from mcti.flags import to_dataclass
from mcti.runtime import setup_process
from mcti.settings import TrainArgs
from mcti.train.outdir import out_dir_is_free
from training.cli import DistTrainArgs, build_parser, preflight, world_size_from_env


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


def launch_local(args: TrainArgs) -> None:
    """Train with args.nproc data-parallel processes on this machine; raises UserError on failure."""
    dargs = args if isinstance(args, DistTrainArgs) else DistTrainArgs(**asdict(args))
    nproc = dargs.nproc
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, not {nproc}")
    preflight(dargs, nproc)
    if not Path(dargs.data).is_dir():  # every rank would find out after loading the model
        raise UserError(f"data folder '{dargs.data}' does not exist")
    out_dir_is_free(dargs.out)  # the ranks would fail one by one (rank 0 takes the lock)
    run_torchrun(dargs, nproc)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    setup_process(verbose=ns.verbose)
    args = to_dataclass(DistTrainArgs, ns)
    rank, world = int(os.environ.get("RANK", "0")), world_size_from_env()
    try:
        if "WORLD_SIZE" not in os.environ and args.nproc > 1:  # no launcher around us: be one
            launch_local(args)
            return 0
        if "WORLD_SIZE" in os.environ and args.nproc not in (1, world):
            raise UserError(f"--nproc {args.nproc} but the launcher started {world} processes")
        resolved = preflight(args, world)
        from training.trainer import run  # heavy imports only once the settings are good

        run(args, resolved)
    except UserError as e:
        where = f" (rank {rank} of {world})" if world > 1 else ""
        print(f"training: error{where}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("training: interrupted", file=sys.stderr)
        return 130
    return 0
