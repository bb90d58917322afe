"""DeepSpeed configs: load a JSON file, check it, and fill in the batch arithmetic.

`--batch-size` is the source of truth: the images of one optimizer step, over all ranks. The
three DeepSpeed batch keys may be "auto" (or absent) and are filled from it, the world size and
the gradient accumulation:

    train_batch_size = --batch-size = world_size x gradient_accumulation_steps x micro-batch

A key given as a number must agree with that. Everything here is plain JSON and arithmetic (no
torch), so a bad setting fails in a second, before any process loads a model.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from mcti.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "zero0_fp32"
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass
class Resolved:
    """A checked DeepSpeed config with its batch keys filled in."""

    path: Path
    config: dict  # what deepspeed.initialize gets
    zero_stage: int
    precision: str  # of the token table in DeepSpeed: fp32 | bf16 | fp16
    micro_batch: int  # images per rank per forward/backward
    grad_accum: int  # micro-batches per rank per optimizer step


def config_path(name: str | None) -> Path:
    """A path, or the name of a shipped config (`zero1_fp32` -> training/configs/zero1_fp32.json)."""
    name = name or DEFAULT_CONFIG
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (name if name.endswith(".json") else f"{name}.json")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
    raise UserError(f"--deepspeed-config '{name}': no such file (shipped configs: {names})")


def load_config(name: str | None) -> tuple[Path, dict]:
    path = config_path(name)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise UserError(f"DeepSpeed config {path} must be a JSON object")
    return path, cfg


def _int_or_auto(cfg: dict, key: str, path: Path) -> int | None:
    v = cfg.get(key, "auto")
    if v == "auto":
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(
            f'DeepSpeed config {path}: {key} must be a positive integer or "auto", not {v!r}'
        )
    return v


def precision_of(cfg: dict) -> str:
    bf16 = bool(cfg.get("bf16", {}).get("enabled", False))
    fp16 = bool(cfg.get("fp16", {}).get("enabled", False))
    if bf16 and fp16:
        raise UserError("the DeepSpeed config enables both bf16 and fp16; pick one")
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def resolve(name: str | None, batch_size: int, world_size: int, grad_accum: int = 0) -> Resolved:
    """Check a config against --batch-size, the world size and --grad-accum (0: the config's)."""
    path, cfg = load_config(name)
    if "optimizer" in cfg:
        raise UserError(
            f'DeepSpeed config {path} has an "optimizer" section: remove it, the trainer passes '
            "torch.optim.AdamW (--lr, --weight-decay) so no fused optimizer is compiled"
        )
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise UserError(
            f"DeepSpeed config {path}: ZeRO stage {stage} is not supported; use 0, 1 or 2 "
            "(stage 3 partitions the parameters, and the token table is the one the objective reads)"
        )
    if batch_size < 1 or world_size < 1 or grad_accum < 0:
        raise UserError("--batch-size must be >= 1 and --grad-accum >= 0")
    cfg_total, cfg_micro, cfg_accum = (_int_or_auto(cfg, k, path) for k in BATCH_KEYS)
    if grad_accum and cfg_accum and grad_accum != cfg_accum:
        raise UserError(
            f"--grad-accum {grad_accum} disagrees with gradient_accumulation_steps {cfg_accum} "
            f"in {path}; drop one of them"
        )
    accum = grad_accum or cfg_accum or 1
    per_step = world_size * accum
    if batch_size % per_step:
        raise UserError(
            f"--batch-size {batch_size} is not divisible by world size {world_size} x gradient "
            f"accumulation {accum} = {per_step} (the micro-batch per rank would be "
            f"{batch_size / per_step:.3g}); pick a batch size that is a multiple of {per_step}"
        )
    micro = batch_size // per_step
    if cfg_micro is not None and cfg_micro != micro:
        raise UserError(
            f"{path}: train_micro_batch_size_per_gpu {cfg_micro} does not match --batch-size "
            f"{batch_size} / (world size {world_size} x gradient accumulation {accum}) = {micro}; "
            'set it to "auto" or change --batch-size'
        )
    if cfg_total is not None and cfg_total != batch_size:
        raise UserError(
            f"{path}: train_batch_size {cfg_total} does not match --batch-size {batch_size}; "
            f'set it to "auto" or pass --batch-size {cfg_total}'
        )
    filled = dict(
        cfg,
        train_batch_size=batch_size,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accum,
    )
    filled.setdefault("steps_per_print", 1 << 30)  # our own progress bar and JSONL instead
    return Resolved(path, filled, stage, precision_of(cfg), micro, accum)
