"""`mcti pretrain` end to end: corpus and networks, the CLIP stage, the denoiser stage with
periodic true-name accuracy and checkpoints, then the model directory and pretrain.json."""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mcti.errors import UserError
from mcti.eval.baselines import true_name_accuracy
from mcti.pretrain.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from mcti.pretrain.clip_stage import train_clip
from mcti.pretrain.corpus import build_corpus, build_vocab
from mcti.pretrain.denoiser import Denoiser, caption_bank, train_denoiser
from mcti.pretrain.networks import (
    build_parts,
    bundle_of,
    parameter_counts,
    save_model_dir,
    text_encoder_of,
)
from mcti.settings import PretrainArgs


def checked(a: PretrainArgs) -> PretrainArgs:
    """The arguments to run with (`--quick` shrinks them), or a UserError."""
    if a.quick:
        a.steps, a.clip_steps = min(a.steps, 6), min(a.clip_steps, 6)
        a.batch_size, a.clip_batch_size = 8, 16
        a.channels, a.eval_every, a.eval_images = "16,32", 3, 4
    if a.steps < 1 or a.clip_steps < 0 or a.batch_size < 2 or a.clip_batch_size < 2:
        raise UserError("need --steps >= 1, --clip-steps >= 0 and batch sizes >= 2")
    if a.resolution < 8 or a.resolution % 4:
        raise UserError("--resolution must be a multiple of 4, >= 8")
    return a


@dataclass
class RunRecord:
    """What pretrain.json and the checkpoint keep besides weights; the JSONL log."""

    out: Path
    recipe: dict  # arguments, concepts, data, parameter counts
    timing: dict  # seconds: clip_s, unet_s, eval_s
    curve: list[dict]  # one true-name accuracy record per evaluation point

    def log(self, rec: dict) -> None:
        with open(self.out / "pretrain_log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def info(self, step: int) -> dict:
        return {**self.recipe, "steps_done": step, "timing": self.timing, "curve": self.curve}


def evaluate_point(a: PretrainArgs, run: RunRecord, parts, den, text_encoder, splits) -> None:
    """True-name accuracy of the EMA weights on held-out seen-class images (cheap schedule);
    with --snapshots also the model of this point."""
    t0 = time.perf_counter()
    bundle = bundle_of(parts, den.ema, text_encoder, a.device)
    rec = {
        "step": den.step,
        "train_min": round((run.timing["clip_s"] + run.timing["unet_s"]) / 60, 2),
        "diffusion": true_name_accuracy(
            bundle, splits, max(1, a.eval_images // 8), "diffusion", "8", "1"
        ),
        "clip": true_name_accuracy(bundle, splits, 25, "clip"),
    }
    run.timing["eval_s"] += time.perf_counter() - t0
    rec["eval_s"] = round(time.perf_counter() - t0, 1)
    run.curve.append(rec)
    run.log({"stage": "eval", **rec})
    if a.snapshots:
        snapshot = run.out / "snapshots" / f"step-{den.step:06d}"
        save_model_dir(parts, den.ema, text_encoder, snapshot, run.info(den.step))


def checkpoint_state(clip, den: Denoiser, run: RunRecord) -> dict:
    """Everything --resume needs (`mcti.pretrain.checkpoint.KEYS`)."""
    return {"clip": clip.state_dict(), **den.state_dict(), "timing": run.timing, "curve": run.curve}


def pretrain(a: PretrainArgs) -> None:
    a = checked(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    ckpt = checkpoint_path(out)
    if ckpt.exists() and not a.resume:
        raise UserError(f"'{out}' holds a checkpoint: pass --resume or choose a new --out")
    state = load_checkpoint(ckpt) if (a.resume and ckpt.exists()) else None
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    corpus, splits = build_corpus(a, limit_per_class=40 if a.quick else 0)
    all_names = corpus.names + [n for s in splits.values() for n in s.names]
    parts = build_parts(a, build_vocab(all_names))
    clip, unet = parts["clip"].to(a.device), parts["unet"].to(a.device)
    recipe = {
        "args": asdict(a),
        "concepts": corpus.names,
        "concept_datasets": corpus.source,
        "n_pretrain_images": len(corpus.concept),
        "novel_classes": {ds: [s.names[k] for k in s.novel] for ds, s in splits.items()},
        "params": parameter_counts(clip, unet),
        "torch_threads": torch.get_num_threads(),
    }
    run = RunRecord(out, recipe, {"clip_s": 0.0, "unet_s": 0.0, "eval_s": 0.0}, [])

    # Stage 1: CLIP (or its weights from the checkpoint)
    if state is not None:
        clip.load_state_dict(state["clip"])
        clip.eval().requires_grad_(False)
        run.timing, run.curve = state["timing"], state["curve"]
    else:
        bar = tqdm(total=a.clip_steps, desc="pretrain clip", unit="step", disable=a.quiet)
        t0 = time.perf_counter()
        train_clip(a, parts, corpus, run.log, bar)
        bar.close()
        run.timing["clip_s"] = round(time.perf_counter() - t0, 1)

    # Stage 2: the denoiser, on the frozen text tower's caption states
    text_encoder = text_encoder_of(clip).to(a.device)
    bank = caption_bank(parts["tokenizer"], corpus.names, text_encoder)  # (Ncap, L, d)
    den = Denoiser.start(a, unet)
    if state is not None:
        den.load_state_dict(state)

    def evaluate_and_save() -> None:  # at every a.eval_every steps
        evaluate_point(a, run, parts, den, text_encoder, splits)
        save_checkpoint(ckpt, checkpoint_state(clip, den, run))

    if state is None and a.eval_every:
        evaluate_point(a, run, parts, den, text_encoder, splits)  # step 0: chance level
    bar = tqdm(total=a.steps, initial=den.step, desc="pretrain unet", unit="step", disable=a.quiet)
    train_denoiser(
        a, den, corpus, bank, parts["scheduler"], run.timing, run.log, evaluate_and_save, bar
    )
    bar.close()
    if a.eval_every and (not run.curve or run.curve[-1]["step"] != den.step):
        evaluate_point(a, run, parts, den, text_encoder, splits)
    save_checkpoint(ckpt, checkpoint_state(clip, den, run))

    run.timing = {k: round(v, 1) for k, v in run.timing.items()}
    run.timing["total_s"] = round(time.perf_counter() - t_start, 1)
    info = {
        **run.info(den.step),
        "reproduce": f"mcti pretrain --out DIR --steps {den.step} --seed {a.seed}",
    }
    save_model_dir(parts, den.ema, text_encoder, out, info)
    n_params = sum(recipe["params"].values())
    print(
        f"wrote the model to {out} ({den.step} denoiser steps, "
        f"{n_params / 1e6:.2f}M parameters, {run.timing['total_s'] / 60:.1f} min)"
    )
    if run.curve:
        last = run.curve[-1]
        print(
            f"true-name accuracy (held-out seen classes): diffusion {last['diffusion']['pooled']:.1%}, "
            f"clip {last['clip']['pooled']:.1%}"
        )
