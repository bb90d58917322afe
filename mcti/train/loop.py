"""Single-process training of class tokens (`mcti train`), with atomic, resumable checkpoints.

The pieces (`prepare`, `batch_of_shots`, `batch_loss`, `run_fingerprint`, `export`) are shared
with the DeepSpeed loop in `training/`, which runs the same objective on shards of the same
global batch; the checkpoint, run log and output-directory guards are in this package too.
With --extend (mcti/train/extend.py) the table trains the new classes only, and the text encoder
reads it joined with the old set's frozen rows (`full_table`).
"""

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mcti.core import openset
from mcti.core.fused import fit_for_tokens, fit_fused, save_fused
from mcti.core.fused_folds import fit_with_folds, shot_folds
from mcti.core.model import ModelBundle, load_model
from mcti.core.objectives import Objective, ObjectiveSettings, ScorerDecision, sample_draws
from mcti.core.store import read_meta, save_tokens, write_tokens
from mcti.core.tokens import TEMPLATES, TokenSet, TokenTable
from mcti.data.coop import open_dataset, pick_shots
from mcti.data.folders import ImageFolder, load_images, load_shots
from mcti.errors import UserError
from mcti.settings import TrainArgs, check_settings, part
from mcti.train.checkpoint import Checkpoint
from mcti.train.extend import (
    Extension,
    JoinedTable,
    old_class_images,
    old_fused_cache,
    plan_extension,
)
from mcti.train.outdir import lock_out_dir, refuse_unless_resume
from mcti.train.runlog import RunLog

# the fused scorer's fit runs after the steps and changes no token: not in the run fingerprint
FUSED_FIT = ("fit_folds", "fused_m", "fused_timesteps")


def settings_of(cfg: TrainArgs) -> ObjectiveSettings:
    """The objective's settings of a run; the whole run is checked again here, since fields may
    have been set after the object was built."""
    check_settings(cfg)
    return part(ObjectiveSettings, cfg)


@dataclass
class Prepared:
    """Everything a training loop needs, computed once (latents are cached, not recomputed)."""

    bundle: ModelBundle
    data: ImageFolder
    shot_paths: list[str]  # the shots of --data
    # The batches' pool of N shots: those of --data, then (--extend) the frozen classes' shots
    labels: torch.Tensor  # (N,) class of each shot
    # (2, N', C, h, w) unflipped, flipped, of the first N' shots: all but the frozen classes'
    # unless --reg denoise (elsewhere their items teach nothing, so are never computed)
    latents: torch.Tensor
    image_embeds: torch.Tensor | None  # (N, P) CLIP embeddings (clip reg)
    tokens: TokenSet  # every class of the output set
    table: TokenTable  # the trained classes (all, unless extending)
    objective: Objective
    extension: Extension | None = None  # --extend: the frozen classes and where they go
    decision: ScorerDecision | None = None  # --reg clip: the scorer's decision (image -> text)


def prepare(cfg: TrainArgs, bundle: ModelBundle | None = None, quiet: bool = False) -> Prepared:
    settings = settings_of(cfg)
    data = open_dataset(cfg.data, "train", min_classes=1 if cfg.extend else 2)
    plan = plan_extension(cfg, data.classes) if cfg.extend else None
    if bundle is None:  # an extension runs on its old set's model unless told
        spec = cfg.model or (read_meta(cfg.extend)["base_model"]["spec"] if plan else "embedded")
        bundle = load_model(spec, cfg.device, cfg.precision, cfg.attention, cfg.clip)
    extension = Extension.of(plan, bundle) if plan else None
    if settings.method == "mcti" and settings.reg == "clip":
        bundle.require_clip()
    picked = pick_shots(data, cfg.shots, cfg.seed)  # CoOp's sampling for coop: specs
    # (N, 3, H, W); an unreadable shot is replaced by a readable file of its class, with a warning
    pixels, kept = load_shots(data, picked, cfg.seed, bundle.resolution)
    labels = torch.tensor([data.labels[i] for i in kept])
    missing = sorted(set(range(len(data.classes))) - set(labels.tolist()))
    if missing:
        raise UserError(f"class '{data.classes[missing[0]]}' has no readable image")
    classes = plan.labels if plan else data.classes  # the output set's classes
    encoded = len(pixels)  # shots whose latents an item can need
    if plan:  # class index in --data -> in the merged set; then the frozen classes' shots
        labels = torch.tensor(plan.trained)[labels]
        clip_reg = settings.method == "mcti" and settings.reg == "clip"
        old = old_class_images(plan, bundle.resolution, required=clip_reg)
        pixels = torch.cat([pixels, *old.values()])
        labels = torch.cat([labels, *(torch.full((len(x),), k) for k, x in old.items())])
        if settings.method == "mcti" and settings.reg == "denoise":  # their items can teach
            encoded = len(pixels)
    with torch.no_grad():
        shots = pixels[:encoded]
        latents = torch.stack(
            [_encode_chunked(bundle, shots), _encode_chunked(bundle, shots.flip(-1))]
        ).cpu()
    image_embeds = class_embeds = counts = None
    if settings.method == "mcti" and settings.reg == "clip":
        image_embeds = bundle.clip_image_features_cpu(pixels)  # (N, P)
        K = len(classes)
        counts = torch.bincount(labels, minlength=K)
        class_embeds = torch.zeros(K, int(counts.max()), image_embeds.shape[1])  # (K, S, P)
        for k in range(K):
            class_embeds[k, : counts[k]] = image_embeds[labels == k]
    tokens = TokenSet(bundle, len(classes), cfg.n_vectors)
    table = TokenTable(len(data.classes), cfg.n_vectors, tokens.init_vector(cfg.init_word))
    table.to(bundle.device)
    objective = Objective(bundle, tokens, settings, class_embeds, counts)
    decision = None
    if image_embeds is not None:  # --reg clip; extending, the frozen classes' texts are fixed
        decision = ScorerDecision(tokens, extension.is_trained if extension else None)
    return Prepared(
        bundle,
        data,
        [data.paths[i] for i in kept],
        labels,
        latents,
        image_embeds,
        tokens,
        table,
        objective,
        extension,
        decision,
    )


def _encode_chunked(bundle: ModelBundle, pixels: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    return torch.cat(
        [bundle.encode_images(pixels[i : i + chunk]) for i in range(0, len(pixels), chunk)]
    )


def global_batch(p: Prepared, batch_size: int, gen: torch.Generator, hard_weights=None) -> dict:
    """Pick a global batch of shots and all its random draws (identical on every rank)."""
    idx = torch.randint(len(p.labels), (batch_size,), generator=gen)
    return batch_of_shots(p, idx, gen, hard_weights)


def batch_of_shots(p: Prepared, idx: torch.Tensor, gen: torch.Generator, hard_weights=None) -> dict:
    """The batch of the shots `idx` with all its random draws (negatives, t, noise, ...)."""
    labels = p.labels[idx]
    draws = sample_draws(
        p.objective.s,
        labels,
        p.tokens.num_classes,
        tuple(p.latents.shape[2:]),
        p.bundle.num_train_timesteps,
        gen,
        hard_weights,
    )
    return {"idx": idx, "labels": labels, **draws}


def batch_loss(p: Prepared, batch: dict) -> tuple[torch.Tensor, dict]:
    """Loss of a (local) batch as made by `global_batch` (or a shard of it). Extending, the
    objective skips the items that teach the trained tokens nothing, scaled so its gradient is
    that of the whole batch. A batch with none computes one item at weight 0: zero gradients,
    so the optimizer steps every trained row, as in a scratch run where a class missed the
    batch (and the metrics keep their keys, which the ranks of a data-parallel run average).
    With --reg clip, `ScorerDecision` is added over every item of the batch."""
    full, scale = batch, 1.0
    if p.extension is not None:
        keep = p.extension.teaches(
            batch, p.objective.s.reg if p.objective.s.method == "mcti" else None
        )
        if not keep.any():  # nothing to teach: --data's first shot at weight 0
            scale = 0.0
            batch = {k: v[:1] for k, v in batch.items()} | {
                "idx": torch.zeros(1, dtype=torch.long),
                "labels": p.labels[:1],
            }
        elif not keep.all():
            scale = keep.float().mean().item()
            batch = {k: v[keep] for k, v in batch.items()}
    loss, metrics = _loss_of(p, batch)
    loss = loss * scale
    if p.decision is not None:
        term, acc = p.decision.loss(
            full_table(p), p.image_embeds[full["idx"]], full["labels"], full.get("negatives")
        )
        loss = loss + p.objective.s.gamma * term
        metrics.update(ce_decision=term.item(), decision_acc=acc, loss=loss.item())
    return loss, metrics


def _loss_of(p: Prepared, batch: dict) -> tuple[torch.Tensor, dict]:
    idx = batch["idx"]
    x0 = p.latents[batch["flip"].long(), idx].to(p.bundle.device)  # (B, C, h, w)
    embeds = p.image_embeds[idx] if p.image_embeds is not None else None
    draws = {k: v for k, v in batch.items() if k not in ("idx", "labels")}
    return p.objective.loss(full_table(p), x0, batch["labels"], draws, embeds)


def full_table(p: Prepared) -> TokenTable | JoinedTable:
    """Every class's vectors, as the text encoder reads them (frozen ones too, extending)."""
    return p.table if p.extension is None else p.extension.joined(p.table)


def run_fingerprint(cfg: TrainArgs, p: Prepared) -> dict:
    """What must match for a checkpoint to continue this run."""
    keep = {
        k: v
        for k, v in asdict(cfg).items()
        if k not in ("steps", "save_every", "resume", "quiet", "out", "device", *FUSED_FIT)
        and not (
            k in ("extend", "replace", "hard_negatives") and not v
        )  # off: the fingerprint of older runs
    }
    fp = {
        "config": json.dumps(keep, sort_keys=True),
        "base_model": p.bundle.fingerprint,
        "shots": json.dumps(p.shot_paths),
    }
    if cfg.method == "mcti" and cfg.reg == "clip":  # a text->image-only checkpoint: refused
        fp["clip_term"] = "scorer-decision/1"
    if p.extension is not None:
        fp["extended_set"] = p.extension.digest()
        # batches from every class's shots, and ScorerDecision (an older extension's checkpoint
        # drew new-class batches alone: refused rather than continued with another objective)
        fp["extension_batches"] = "all-classes/1"
    return fp


def export(cfg: TrainArgs, p: Prepared, step: int, extra: dict | None = None) -> None:
    run = {
        "method": cfg.method,
        "reg": cfg.reg if cfg.method == "mcti" else None,
        "steps": step,
        "settings": asdict(cfg),
        "data_root": str(p.data.root.resolve()),
        "train_files": p.shot_paths,
        **(extra or {}),
    }
    if p.extension is not None:
        write_tokens(cfg.out, p.extension.merged(p.table, run))
        return
    save_tokens(cfg.out, p.table, p.data.classes, p.bundle, run)


def train(cfg: TrainArgs, bundle: ModelBundle | None = None) -> Prepared:
    """Train tokens and write them to cfg.out; returns the prepared state (for tests)."""
    out = Path(cfg.out)
    ckpt = Checkpoint(out)
    refuse_unless_resume(out, ckpt.exists(), cfg.resume)
    with lock_out_dir(out):
        p = prepare(cfg, bundle, quiet=cfg.quiet)
        opt = torch.optim.AdamW([p.table.vectors], lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        fp = run_fingerprint(cfg, p)
        step = ckpt.load(p.table, opt, gen, fp) if (cfg.resume and ckpt.exists()) else 0
        log = RunLog(out / "metrics.jsonl")
        log.trim(step)  # a resumed run redoes the steps after its checkpoint
        run_steps(cfg, p, opt, gen, fp, step, log)
        pixels = shot_pixels(p) if p.bundle.clip is not None else None  # read once for both
        save_fused_state(cfg, p, pixels)
        save_open_set_state(cfg, p, pixels)
    return p


def save_fused_state(cfg: TrainArgs, p: Prepared, pixels: torch.Tensor | None = None) -> None:
    """The fused scorer's state (mcti.core.fused) of the finished tokens, fitted on their shots;
    none without a CLIP vision tower. An extension's cache is OLD's cache (or, if OLD has none,
    the features of OLD's training images) plus the new shots' features, refitted as a whole.
    `pixels`: the shots (N, 3, H, W) if already read."""
    if p.bundle.clip is None:
        return
    pixels = shot_pixels(p) if pixels is None else pixels  # (N, 3, H, W)
    labels = p.labels[: len(pixels)]
    if p.extension is None and cfg.fit_folds:
        folds, tables = fold_tables(cfg, p)
        state = fit_with_folds(
            p.bundle, p.tokens, tables, folds, pixels, labels,
            diffusion_m=cfg.fused_m, diffusion_timesteps=cfg.fused_timesteps,
        )  # fmt: skip
        save_fused(cfg.out, state)
        return
    if p.extension is None:
        save_fused(cfg.out, fit_for_tokens(p.bundle, p.tokens, p.table, pixels, labels))
        return
    feats = p.bundle.clip_image_features_cpu(pixels)  # (N, P)
    old = old_fused_cache(p.extension.plan) or _old_class_features(p)
    if old is not None:
        feats, labels = torch.cat([old[0], feats]), torch.cat([old[1], labels])
    K = p.tokens.num_classes
    with torch.no_grad():
        prompts = [p.tokens.prompt(k, TEMPLATES[0]) for k in range(K)]
        text = p.tokens.clip_text_features(full_table(p), prompts).float().cpu()  # (K, P)
    save_fused(cfg.out, fit_fused(feats, labels, K, feats @ text.T))


def save_open_set_state(cfg: TrainArgs, p: Prepared, pixels: torch.Tensor | None = None) -> None:
    """The open-set reference and `--reject auto` thresholds (mcti.core.openset), fit on the
    shots leave-one-out; skipped as the fused state is (classify then fits it from the shots)."""
    if p.bundle.clip is None or p.extension is not None:
        return
    pixels = shot_pixels(p) if pixels is None else pixels  # (N, 3, H, W)
    openset.fit_on_shots(p.bundle, pixels, p.labels[: len(pixels)], p.tokens.num_classes).save(
        cfg.out
    )


def shot_pixels(p: Prepared) -> torch.Tensor:
    """(N, 3, H, W) the run's shots, read again (the latents are all training keeps)."""
    where = {path: i for i, path in enumerate(p.data.paths)}
    idx = [where[path] for path in p.shot_paths]
    return load_images(p.data, idx, p.bundle.resolution, quiet=True)[0]


def _old_class_features(p: Prepared) -> tuple[torch.Tensor, torch.Tensor] | None:
    """CLIP features (N, P) and merged classes (N,) of OLD's training images, where readable (for
    an OLD without fused state)."""
    images = old_class_images(p.extension.plan, p.bundle.resolution, required=False)
    if not images:
        return None
    feats = torch.cat([p.bundle.clip_image_features_cpu(x) for x in images.values()])
    return feats, torch.cat([torch.full((len(x),), k) for k, x in images.items()])


def fold_tables(cfg: TrainArgs, p: Prepared) -> tuple[torch.Tensor, list[TokenTable]]:
    """--fit-folds K: the shots' folds (N,) and K token tables, table j trained like the run's
    own (same settings and steps; its own seed) on the shots outside fold j, for the fused
    scorer's out-of-fold evidence. Not checkpointed: a resumed run trains them again."""
    folds = shot_folds(p.labels, cfg.fit_folds)
    K, tables = p.tokens.num_classes, []
    for j in range(cfg.fit_folds):
        keep = (folds != j).nonzero().squeeze(1)
        labels, embeds = p.labels[keep], None
        class_embeds = counts = None
        if p.image_embeds is not None:  # clip reg: positives and negatives from kept shots only
            embeds = p.image_embeds[keep]
            counts = torch.bincount(labels, minlength=K)
            class_embeds = torch.zeros(K, int(counts.max()), embeds.shape[1])  # (K, S, P)
            for k in range(K):
                class_embeds[k, : counts[k]] = embeds[labels == k]
        table = TokenTable(K, cfg.n_vectors, p.tokens.init_vector(cfg.init_word))
        table.to(p.bundle.device)
        objective = Objective(p.bundle, p.tokens, p.objective.s, class_embeds, counts)
        sub = replace(
            p, labels=labels, latents=p.latents[:, keep], image_embeds=embeds, table=table,
            objective=objective, shot_paths=[p.shot_paths[i] for i in keep.tolist()],
        )  # fmt: skip
        opt = torch.optim.AdamW([table.vectors], lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed + 1 + j)
        for _ in range(cfg.steps):
            loss, _ = batch_loss(sub, global_batch(sub, cfg.batch_size, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        tables.append(table)
    return folds, tables


def run_steps(
    cfg: TrainArgs,
    p: Prepared,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    fp: dict,
    step: int,
    log: RunLog,
) -> None:
    """Steps `step + 1 .. cfg.steps`, with a checkpoint and token export every --save-every."""
    ckpt = Checkpoint(cfg.out)
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=cfg.quiet,
        desc=f"train {cfg.method}",
        unit="step",
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    while step < cfg.steps:
        loss, metrics = batch_loss(p, global_batch(p, cfg.batch_size, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
        log.append({"step": step, **metrics, "elapsed_s": round(time.perf_counter() - t0, 3)})
        if step % cfg.save_every == 0 or step == cfg.steps:
            ckpt.save(step, p.table, opt, gen, fp)
            export(cfg, p, step)
    bar.close()
    if not (Path(cfg.out) / "classes.json").is_file():  # resumed a finished run
        export(cfg, p, step)
