"""`python -m training`: the data-parallel trainer's command line (one process per rank).

    torchrun --nproc_per_node N [--nnodes M ...] -m training --data DIR --out TOKENS [...]
    deepspeed --num_gpus N --module training --data DIR --out TOKENS [...]
    mcti train --nproc N ...            (one machine; same as python -m training --nproc N)

The flags are those of `mcti train` plus the `DistTrainArgs` fields below; `build_parser()` is
also how the Kubernetes Job's arguments are checked. Top-level imports stay light: settings are
checked (`preflight`) before torch, DeepSpeed or a model is loaded. The entry point, `main`, is
in `training.launch` (it imports this module; this module imports neither it nor the trainer).
"""

import argparse
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from mcti.errors import UserError
from mcti.flags import SettingsParser, add_dataclass_args
from mcti.settings import TrainArgs
from mcti.train.outdir import refuse_unless_resume
from training import ds_config


@dataclass
class DistTrainArgs(TrainArgs):
    deepspeed_config: str | None = None
    """DeepSpeed JSON config: a file or a shipped name (zero0_fp32, zero1_fp32, zero2_fp32, zero0_fp32_accum4, zero1_bf16, zero2_fp16, zero2_bf16_accum4); default zero0_fp32. Its "auto" batch keys are filled from --batch-size, the world size and --grad-accum."""
    grad_accum: int = 0
    """Micro-batches per rank per optimizer step (gradient accumulation); 0: the config's gradient_accumulation_steps, else 1. Micro-batch per rank = --batch-size / (world size x grad-accum)."""
    hard_refresh: int = 10
    """--hard-negatives: recompute the token similarities every N steps."""
    hard_temperature: float = 0.1
    """--hard-negatives: temperature of the similarity weights (lower: harder negatives)."""
    timeout_s: float = 300.0
    """Seconds a collective waits for the other ranks before the job fails, so a dead or stuck rank never hangs the job."""
    tensorboard: bool = False
    """Also write the per-step metrics as TensorBoard scalars to OUT/tensorboard (needs the tensorboard package)."""


def build_parser() -> argparse.ArgumentParser:
    parser = SettingsParser(
        prog="python -m training",
        description="Data-parallel MC-TI training with DeepSpeed (start it with torchrun or deepspeed).",
    )
    add_dataclass_args(parser, DistTrainArgs)
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--verbose", action="store_true", help="Show third-party progress bars and warnings."
    )
    return parser


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def preflight(args: DistTrainArgs, world_size: int) -> ds_config.Resolved:
    """Every check that needs no model: fails in a second, before any process does real work."""
    resolved = ds_config.resolve(
        args.deepspeed_config, args.batch_size, world_size, args.grad_accum
    )
    if args.hard_refresh < 1 or args.hard_temperature <= 0:
        raise UserError("--hard-refresh must be >= 1 and --hard-temperature > 0")
    if args.timeout_s <= 0:
        raise UserError("--timeout-s must be > 0")
    if args.steps < 1 or args.save_every < 1:
        raise UserError("--steps and --save-every must be >= 1")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)")
    half = resolved.precision
    if half != "fp32":
        if args.precision not in ("fp32", half):
            raise UserError(
                f"--precision {args.precision} conflicts with {half} in {resolved.path}; "
                f"the frozen model runs in the config's precision ({half})"
            )
        if resolved.zero_stage == 0:
            raise UserError(
                f"{resolved.path}: {half} needs ZeRO stage 1 or 2 here (at stage 0 DeepSpeed keeps "
                "the fp32 master tokens where they cannot be exported); use zero1_bf16 or zero2_fp16"
            )
        if args.device == "cpu":
            raise UserError(
                f"{resolved.path} enables {half}, which needs CUDA; on CPU use a *_fp32 config"
            )
    if args.extend:  # old set, labels, --replace: before any rank loads the model
        from mcti.train.extend import check_extension  # torch: only when extending

        check_extension(args)
    ckpt = Path(args.out) / "checkpoint"
    if (ckpt / "state.json").is_file():
        raise UserError(
            f"'{args.out}' holds a checkpoint of single-process `mcti train`; continue it with "
            "`mcti train --resume`, or pick a new --out"
        )
    refuse_unless_resume(args.out, (ckpt / "latest").is_file(), args.resume)
    return resolved
