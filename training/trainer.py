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
import logging
import os
import resource
import socket
import sys
import time
import warnings
from dataclasses import fields, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from mcti.atomic import atomic_write
from mcti.core.model import resolve_device
from mcti.core.objectives import shard_draws
from mcti.core.tokens import TokenTable
from mcti.errors import UserError
from mcti.settings import TrainArgs
from mcti.train.loop import Prepared, batch_loss, batch_of_shots, export, prepare, run_fingerprint
from training.checkpoint import DistCheckpoint
from training.cli import DistTrainArgs
from training.ds_config import Resolved


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
    def of(cls, table: TokenTable, temperature: float) -> "SimilarityRows":
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
    fp = run_fingerprint(replace(base, nproc=1), p)
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


def trim_log(path: Path, last_step: int) -> None:
    """Keep the metric lines up to `last_step` (a resumed run redoes the steps after it); a
    line cut short by a killed process is dropped."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(ln + "\n" for ln in keep)))


def is_peer_failure(e: BaseException) -> bool:
    """Errors of a collective whose peer died or stalled (gloo/NCCL), as opposed to our bugs."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text
        for s in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Timed out")
    )


def run(args: DistTrainArgs, resolved: Resolved) -> None:
    """One rank of a data-parallel run; writes the token directory args.out (rank 0)."""
    t_start = time.perf_counter()
    rank, world, device = init_distributed(args, resolved)
    try:
        train_loop(args, resolved, rank, world, device, t_start)
    except Exception as e:
        if not is_peer_failure(e):
            raise
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(
            f"training: error (rank {rank} of {world}): another rank died, or stalled for longer "
            f"than --timeout-s {args.timeout_s:g} (a collective failed; that rank's own error is "
            f"in its output). The last complete checkpoint in {args.out}/checkpoint stays "
            f"loadable: rerun with --resume. Cause: {cause}",
            file=sys.stderr,
            flush=True,
        )
        # Leave now: tearing down a process group with a dead peer can block.
        os._exit(1)
    dist.barrier()  # the group stays up: DeepSpeed caches its groups for later runs in-process


def train_loop(
    args: DistTrainArgs,
    resolved: Resolved,
    rank: int,
    world: int,
    device: torch.device,
    t_start: float,
) -> None:
    precision = resolved.precision if resolved.precision != "fp32" else args.precision
    cfg = replace(args, device=str(device), precision=precision)
    out, ckpt = Path(args.out), DistCheckpoint(args.out)
    p = prepare(cfg, quiet=args.quiet or rank != 0)
    engine = build_engine(p, cfg, resolved)
    gen = torch.Generator().manual_seed(args.seed)
    fp = fingerprint(cfg, p, resolved)
    step, hard = 0, None
    if args.resume and ckpt.latest() is not None:
        step, state = ckpt.load(engine, fp, world, resolved.zero_stage)
        gen.set_state(state["rng"])
        if state.get("hard") is not None:
            hard = SimilarityRows(state["hard"], args.hard_temperature)
    K, G = p.tokens.num_classes, resolved.grad_accum
    negatives = min(args.negatives, K - 1) if args.method == "mcti" else 0
    info = {
        "world_size": world,
        "zero_stage": resolved.zero_stage,
        "table_precision": resolved.precision,
        "model_precision": precision,
        "micro_batch": resolved.micro_batch,
        "grad_accum": G,
        "deepspeed_config": str(resolved.path),
        "startup_s": round(time.perf_counter() - t_start, 3),  # group, model, latents, engine
        "startup_peak_mem_mb": round(peak_mem_mb(device), 1),
    }
    log, writer = out / "metrics.jsonl", None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        trim_log(log, step)
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))

    def save(step: int) -> None:
        table = master_table(p)  # collective under ZeRO with bf16/fp16

        def write_tokens() -> None:
            export(cfg, replace(p, table=table), step, {"trainer": info})

        ckpt.save(
            engine,
            step,
            {"rng": gen.get_state(), "hard": None if hard is None else hard.unit},
            {"world_size": world, "zero_stage": resolved.zero_stage, "run": fp},
            on_complete=write_tokens,
        )

    if rank == 0 and not args.quiet:
        print(
            f"training: {K} classes, {len(p.labels)} shots, {world} rank(s) x micro-batch "
            f"{resolved.micro_batch} x accumulation {G} = batch {args.batch_size}, ZeRO "
            f"{resolved.zero_stage}, {resolved.precision} tokens, start-up {info['startup_s']:.1f} s"
            + (f", resumed at step {step}" if step else ""),
            file=sys.stderr,
        )
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
        if args.hard_negatives and (hard is None or step % args.hard_refresh == 0):
            hard = SimilarityRows.of(p.table, args.hard_temperature)
        t_step, cpu_step = time.perf_counter(), time.process_time()
        batch = draw_batch(p, args.batch_size, gen, hard)
        totals: dict[str, float] = {}
        for g in range(G):
            loss, metrics = engine(shard_draws(batch, rank * G + g, world * G))
            engine.backward(loss)
            engine.step()  # steps the optimizer after the G-th micro-batch
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / G
        metrics = mean_over_ranks(totals, device)
        dt, cpu = time.perf_counter() - t_step, time.process_time() - cpu_step
        step += 1
        if rank == 0:
            record = {
                "step": step,
                **metrics,
                "lr": engine.get_lr()[0],
                "samples_per_s": args.batch_size / dt,
                "step_s": dt,
                "step_cpu_s": cpu,  # rank 0's CPU time: unlike step_s, blind to other jobs' load
                "K": K,
                "negatives": negatives,
                "hard_negatives": args.hard_negatives,
                "world_size": world,
                "micro_batch": resolved.micro_batch,
                "grad_accum": G,
                "peak_mem_mb": peak_mem_mb(device),
                "elapsed_s": time.perf_counter() - t0,
            }
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                for k, v in record.items():
                    if isinstance(v, int | float) and not isinstance(v, bool) and k != "step":
                        writer.add_scalar(k, v, step)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
        if step % args.save_every == 0 or step == args.steps:
            save(step)
    bar.close()
    if writer is not None:
        writer.close()
    if not ran:  # resumed a run that had already finished: export its tokens again
        table = master_table(p)
        if rank == 0:
            export(cfg, replace(p, table=table), step, {"trainer": info})
    if rank == 0 and not args.quiet:
        print(f"wrote {K} class tokens to {out}/learned_embeds.safetensors and {out}/classes.json")
