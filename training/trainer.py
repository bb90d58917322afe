"""Data-parallel MC-TI with DeepSpeed: every rank draws the same global batch, trains on its slice.

Per optimizer step, every rank draws the *global* batch (shots, templates, flips, t, eps,
negatives) from the same seeded generator, then takes its contiguous slice of it for each
micro-batch (`shard_draws`). The loss of a micro-batch is its mean over images and DeepSpeed
averages gradients over ranks and accumulation steps, so the update is that of one process on the
whole batch: 2 ranks x micro-batch b equal 1 rank x 2b (to float rounding), and a resumed run
continues the exact sequence of draws.

Only the token table is a DeepSpeed parameter. The frozen UNet, text encoder, VAE and CLIP are
built on every rank by `mcti.train.prepare` (latents encoded once, at start) and held outside the
module that DeepSpeed wraps, so ZeRO never partitions them and the optimizer never sees them.
"""

import json
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from mcti.core.objectives import shard_draws
from mcti.core.tokens import TokenTable
from mcti.settings import TrainArgs
from mcti.train.extend import JoinedTable
from mcti.train.loop import (
    Prepared,
    batch_loss,
    batch_of_shots,
    export,
    full_table,
    prepare,
    run_fingerprint,
    save_fused_state,
)
from mcti.train.outdir import lock_out_dir
from mcti.train.runlog import RunLog
from training.checkpoint import DistCheckpoint
from training.cli import DistTrainArgs
from training.ds_config import Resolved
from training.ranks import ProcessTable, init_distributed, is_peer_failure, peer_failure_line


class TokenModule(nn.Module):
    """What DeepSpeed wraps: the token table is its only parameter. The frozen model sits in a
    plain (non-Module) attribute, so it is not registered, partitioned, cast or optimized."""

    def __init__(self, p: Prepared):
        super().__init__()
        self.table = p.table
        self.p = p  # a dataclass: nn.Module does not register what is inside it

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return batch_loss(self.p, batch)


class SimilarityRows:
    """Hard-negative weights w[y, c] = exp((cos(u_y, u_c) - 1) / T), u = token vectors minus
    their mean over classes (all tokens start at the same word: centring makes the learned
    directions, not the shared start, decide). Rows are computed when `sample_negatives` asks
    for them, so memory is O(K d) like the table, never (K, K)."""

    def __init__(self, unit: torch.Tensor, temperature: float):
        self.unit, self.temperature = unit, temperature  # (K, n * d) unit rows, CPU

    @classmethod
    def of(cls, table: TokenTable | JoinedTable, temperature: float) -> "SimilarityRows":
        v = table.per_class().detach().float().flatten(1)  # (K, n * d)
        unit = nn.functional.normalize(v - v.mean(0), dim=1)
        if dist.is_initialized():  # every rank must draw the same negatives: use rank 0's rows
            dist.broadcast(unit, src=0)
        return cls(unit.cpu(), temperature)

    def __getitem__(self, y: int) -> torch.Tensor:
        return torch.exp((self.unit @ self.unit[y] - 1) / self.temperature)  # (K,)


def draw_batch(
    p: Prepared, batch_size: int, gen: torch.Generator, hard: SimilarityRows | None = None
) -> dict:
    """The global batch of one optimizer step, identical on every rank. Shots are drawn without
    replacement (a seeded permutation, repeated only when the batch exceeds the shots), so the
    ranks' slices hold disjoint images."""
    N = len(p.labels)
    perms = [torch.randperm(N, generator=gen) for _ in range(-(-batch_size // N))]
    return batch_of_shots(p, torch.cat(perms)[:batch_size], gen, hard)


def build_engine(p: Prepared, args: DistTrainArgs, resolved: Resolved):
    """DeepSpeed engine over the token table alone, with a plain torch AdamW: DeepSpeed's own
    {"type": "AdamW"} would JIT-compile a fused optimizer (~50 s) for a K x d parameter."""
    import deepspeed

    opt = torch.optim.AdamW([p.table.vectors], lr=args.lr, weight_decay=args.weight_decay)
    engine, *_ = deepspeed.initialize(
        model=TokenModule(p), optimizer=opt, config=resolved.config, dist_init_required=False
    )
    return engine


def master_table(p: Prepared) -> TokenTable:
    """The tokens to export: DeepSpeed's fp32 master copy when the table trains in bf16/fp16.
    A collective under ZeRO: every rank calls it."""
    if p.table.vectors.dtype == torch.float32:
        return p.table
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p.table.vectors)  # ZeRO 1/2 (stage 0 + half is refused)
    table = TokenTable(p.table.num_classes, p.table.n_vectors, torch.zeros(full.shape[1]))
    with torch.no_grad():
        table.vectors.copy_(full.float().cpu())
    return table


def fingerprint(args: DistTrainArgs, p: Prepared, resolved: Resolved) -> dict:
    """What must match for a checkpoint to continue this run (not: world size, ZeRO stage,
    micro-batch, accumulation, which do not change the math)."""
    base = TrainArgs(**{f.name: getattr(args, f.name) for f in fields(TrainArgs)})
    # hard negatives are in "trainer" below (where checkpoints before the flag moved to
    # TrainArgs have them): left out of "config", so those checkpoints still resume
    fp = run_fingerprint(replace(base, nproc=1, hard_negatives=False), p)
    fp["trainer"] = json.dumps(
        {
            "sampler": "permutation",
            "hard_negatives": args.hard_negatives,
            "hard_refresh": args.hard_refresh if args.hard_negatives else None,
            "hard_temperature": args.hard_temperature if args.hard_negatives else None,
            "table_precision": resolved.precision,
        },
        sort_keys=True,
    )
    return fp


def mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist(), strict=True)}


def peak_mem_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(args: DistTrainArgs, resolved: Resolved) -> None:
    """One rank of a data-parallel run; writes the token directory args.out (rank 0, which
    holds the lock on it for the whole run)."""
    t_start = time.perf_counter()
    rank, world, device = init_distributed(args, resolved)
    table = ProcessTable.gather()
    try:
        with lock_out_dir(args.out) if rank == 0 else nullcontext():
            train_loop(args, resolved, rank, world, device, t_start)
    except Exception as e:
        if not is_peer_failure(e):
            raise
        print(peer_failure_line(e, table, args.timeout_s, args.out), file=sys.stderr, flush=True)
        # Leave now: tearing down a process group with a dead peer can block.
        os._exit(1)
    dist.barrier()  # the group stays up: DeepSpeed caches its groups for later runs in-process


@dataclass
class Rank:
    """What one rank's steps share: settings, model, engine, random state."""

    args: DistTrainArgs  # with the resolved device and model precision
    resolved: Resolved
    rank: int
    world: int
    device: torch.device
    p: Prepared
    engine: Any  # deepspeed.DeepSpeedEngine
    gen: torch.Generator
    fingerprint: dict
    info: dict  # the run's shape, recorded in classes.json["trainer"]
    hard: SimilarityRows | None = None


def start(
    args: DistTrainArgs, resolved: Resolved, rank: int, world: int, device: torch.device, t0: float
) -> tuple[Rank, int]:
    """Model, latents and engine; restored from the last checkpoint with --resume. Returns the
    rank's state and the step to continue from."""
    precision = resolved.precision if resolved.precision != "fp32" else args.precision
    cfg = replace(args, device=str(device), precision=precision)
    p = prepare(cfg, quiet=args.quiet or rank != 0)
    engine = build_engine(p, cfg, resolved)
    info = {
        "world_size": world,
        "zero_stage": resolved.zero_stage,
        "table_precision": resolved.precision,
        "model_precision": precision,
        "micro_batch": resolved.micro_batch,
        "grad_accum": resolved.grad_accum,
        "deepspeed_config": str(resolved.path),
        "startup_s": round(time.perf_counter() - t0, 3),  # group, model, latents, engine
        "startup_peak_mem_mb": round(peak_mem_mb(device), 1),
    }
    gen = torch.Generator().manual_seed(args.seed)
    fp = fingerprint(cfg, p, resolved)
    r = Rank(cfg, resolved, rank, world, device, p, engine, gen, fp, info)
    ckpt, step = DistCheckpoint(args.out), 0
    if args.resume and ckpt.latest() is not None:
        step, state = ckpt.load(engine, r.fingerprint, world, resolved.zero_stage)
        r.gen.set_state(state["rng"])
        if state.get("hard") is not None:
            r.hard = SimilarityRows(state["hard"], args.hard_temperature)
    return r, step


def optimizer_step(r: Rank, step: int) -> dict[str, float]:
    """One optimizer step from `step`: the global batch, this rank's micro-batches of it, the
    metrics averaged over ranks."""
    a = r.args
    if a.hard_negatives and (r.hard is None or step % a.hard_refresh == 0):
        r.hard = SimilarityRows.of(full_table(r.p), a.hard_temperature)  # frozen classes too
    batch = draw_batch(r.p, a.batch_size, r.gen, r.hard)
    G, totals = r.resolved.grad_accum, {}
    for g in range(G):
        loss, metrics = r.engine(shard_draws(batch, r.rank * G + g, r.world * G))
        r.engine.backward(loss)
        r.engine.step()  # steps the optimizer after the G-th micro-batch
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v / G
    return mean_over_ranks(totals, r.device)


def step_record(r: Rank, step: int, metrics: dict, dt: float, cpu: float, elapsed: float) -> dict:
    """The metrics.jsonl line of a step (rank 0)."""
    K = r.p.tokens.num_classes
    return {
        "step": step,
        **metrics,
        "lr": r.engine.get_lr()[0],
        "samples_per_s": r.args.batch_size / dt,
        "step_s": dt,
        "step_cpu_s": cpu,  # rank 0's CPU time: unlike step_s, blind to other jobs' load
        "K": K,
        "negatives": min(r.args.negatives, K - 1) if r.args.method == "mcti" else 0,
        "hard_negatives": r.args.hard_negatives,
        "world_size": r.world,
        "micro_batch": r.resolved.micro_batch,
        "grad_accum": r.resolved.grad_accum,
        "peak_mem_mb": peak_mem_mb(r.device),
        "elapsed_s": elapsed,
    }


def export_tokens(r: Rank, step: int) -> None:
    """Write the token directory (a collective under ZeRO with bf16/fp16; rank 0 writes)."""
    table = master_table(r.p)
    if r.rank == 0:
        export(r.args, replace(r.p, table=table), step, {"trainer": r.info})


def write_fused_state(r: Rank) -> None:
    """The fused scorer's state of the final tokens, fitted on the shots as single-process
    `mcti train` fits it (rank 0 writes; a collective under ZeRO with bf16/fp16)."""
    table = master_table(r.p)
    if r.rank == 0:
        save_fused_state(r.args, replace(r.p, table=table))


def save(r: Rank, step: int) -> None:
    """Checkpoint (every rank) and token export (rank 0), then switch `latest`."""
    table = master_table(r.p)  # collective under ZeRO with bf16/fp16
    DistCheckpoint(r.args.out).save(
        r.engine,
        step,
        {"rng": r.gen.get_state(), "hard": None if r.hard is None else r.hard.unit},
        {"world_size": r.world, "zero_stage": r.resolved.zero_stage, "run": r.fingerprint},
        on_complete=lambda: export(r.args, replace(r.p, table=table), step, {"trainer": r.info}),
    )


def tensorboard_writer(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"))


def add_scalars(writer, record: dict) -> None:
    """A step's numeric metrics as TensorBoard scalars."""
    for k, v in record.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "step":
            writer.add_scalar(k, v, record["step"])


def announce(r: Rank, step: int) -> None:
    """One line on rank 0: the run's shape and start-up time."""
    res = r.resolved
    print(
        f"training: {r.p.tokens.num_classes} classes, {len(r.p.labels)} shots, {r.world} rank(s) "
        f"x micro-batch {res.micro_batch} x accumulation {res.grad_accum} = batch "
        f"{r.args.batch_size}, ZeRO {res.zero_stage}, {res.precision} tokens, start-up "
        f"{r.info['startup_s']:.1f} s" + (f", resumed at step {step}" if step else ""),
        file=sys.stderr,
    )


def train_loop(
    args: DistTrainArgs,
    resolved: Resolved,
    rank: int,
    world: int,
    device: torch.device,
    t_start: float,
) -> None:
    r, step = start(args, resolved, rank, world, device, t_start)
    out, writer = Path(args.out), None
    log = RunLog(out / "metrics.jsonl")
    if rank == 0:
        log.trim(step)  # a resumed run redoes the steps after its checkpoint
        writer = tensorboard_writer(out) if args.tensorboard else None
        if not args.quiet:
            announce(r, step)
    bar = tqdm(
        total=args.steps,
        initial=step,
        disable=args.quiet or rank != 0,
        desc=f"train {args.method} x{world}",
        unit="step",
        dynamic_ncols=True,
    )
    t0, ran = time.perf_counter(), step < args.steps
    while step < args.steps:
        t_step, cpu_step = time.perf_counter(), time.process_time()
        metrics = optimizer_step(r, step)
        dt, cpu = time.perf_counter() - t_step, time.process_time() - cpu_step
        step += 1
        if rank == 0:
            record = step_record(r, step, metrics, dt, cpu, time.perf_counter() - t0)
            log.append(record)
            if writer is not None:
                add_scalars(writer, record)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
        if step % args.save_every == 0 or step == args.steps:
            save(r, step)
    bar.close()
    if writer is not None:
        writer.close()
    if not ran:  # resumed a run that had already finished: export its tokens again
        export_tokens(r, step)
    write_fused_state(r)
    if rank == 0 and not args.quiet:
        K = r.p.tokens.num_classes
        print(f"wrote {K} class tokens to {out}/learned_embeds.safetensors and {out}/classes.json")
