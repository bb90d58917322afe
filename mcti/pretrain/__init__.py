"""`mcti pretrain`: train the embedded base model from scratch on offline captioned images.

Two stages, both on the pretraining part of `mcti.data.offline`'s fixed split (novel classes and
held-out images are never touched):
1. CLIP: a small CLIP text tower and ViT vision tower trained contrastively on (image, caption)
   pairs. Captions name the concept the way web captions do ("a photo of a sneaker"); images
   whose captions name the same concept are all positives (soft targets).
2. Denoiser: a pixel-space UNet2DConditionModel (cross-attention at every resolution, plus the
   pooled text added to the time embedding) trained on the noise-prediction loss, conditioned
   on the *frozen* text tower's hidden states; EMA of weights; low caption dropout (so the
   classifier-free "" prompt exists for sampling, while almost every step teaches the UNet to
   use its text). The LR is constant after warm-up, so stopping after N steps gives exactly the
   model that `--steps N` reproduces.

Output: a diffusers-format directory without vae/ (model_index.json, unet/, text_encoder/,
tokenizer/, scheduler/) plus clip/ (transformers CLIPModel, text tower == text_encoder/), and
pretrain.json (recipe, data, timings, true-name accuracy curve). `mcti.core.model.load_model(DIR)`
loads it; the shipped `embedded` model is one such directory.
"""

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mcti.errors import UserError

DATASETS = ("animal-mnist", "fashion-mnist", "digits")
# Caption templates: the prompt templates tokens are learned with (mcti.core.tokens.TEMPLATES), plus
# a few drawing-style ones; the concept's name goes into {}.
EXTRA_TEMPLATES = (
    "a drawing of a {}",
    "a silhouette of a {}",
    "a picture of a {}",
    "an image of the {}",
    "a {}",
)
GENERIC_WORD = "object"  # mcti's default --init-word: captions sometimes use it instead of a name
MAX_TOKENS = 24  # text length (short prompts; keeps cross-attention cheap)


@dataclass
class PretrainArgs:
    out: str = ""
    """Output model directory (diffusers format + clip/); also holds checkpoint/ and the log."""
    steps: int = 3078
    """Denoiser (UNet) training steps (3078: the shipped embedded model)."""
    clip_steps: int = 1500
    """Contrastive CLIP steps (stage 1)."""
    minutes: float = 0.0
    """Stop the denoiser stage after this many minutes of training (0: no limit); the model records the steps done, which `--steps` reproduces."""
    batch_size: int = 32
    """Denoiser batch size."""
    clip_batch_size: int = 128
    """CLIP batch size."""
    lr: float = 5e-4
    """Denoiser AdamW learning rate (constant after warm-up)."""
    clip_lr: float = 1e-3
    """CLIP AdamW learning rate (cosine decay)."""
    ema: float = 0.999
    """EMA decay of the denoiser weights (the EMA weights are what is saved)."""
    caption_dropout: float = 0.1
    """Fraction of denoiser steps' captions replaced by the empty prompt (for guidance)."""
    generic_captions: float = 0.05
    """Fraction of captions that say the generic word ('a photo of a object') instead of the name."""
    resolution: int = 16
    """Image side in pixels (pixel-space model, no VAE)."""
    channels: str = "32,64,96"
    """UNet block channels, comma-separated (one CrossAttn block per entry)."""
    datasets: str = ",".join(DATASETS)
    """Offline datasets whose seen classes are the concepts (see mcti/data/offline.py)."""
    seed: int = 0
    """Seed of initialisation and every random draw."""
    threads: int = 1
    """torch CPU threads (0: torch's default)."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    eval_every: int = 500
    """Measure true-name accuracy on held-out seen-class images every N denoiser steps (0: never)."""
    eval_images: int = 30
    """Held-out images per dataset for the periodic accuracy (cheap 8-timestep diffusion scorer)."""
    snapshots: bool = False
    """Also keep the model of every evaluation point under OUT/snapshots/step-N."""
    resume: bool = False
    """Continue from OUT/checkpoint if present."""
    quick: bool = False
    """Tiny smoke-test setting (seconds): few steps, small data, tiny networks."""
    quiet: bool = False
    """No progress bars."""


def _quick(a: PretrainArgs) -> PretrainArgs:
    a.steps, a.clip_steps = min(a.steps, 6), min(a.clip_steps, 6)
    a.batch_size, a.clip_batch_size = 8, 16
    a.channels, a.eval_every, a.eval_images = "16,32", 3, 4
    return a


def captions_for(name: str) -> list[str]:
    from mcti.core.tokens import TEMPLATES

    return [t.format(name) for t in (*TEMPLATES, *EXTRA_TEMPLATES)]


def build_vocab(concept_names: list[str]) -> list[str]:
    """Whole words of the tokenizer: template words, concept names, generic words."""
    import re

    from mcti.core.tiny import TINY_WORDS
    from mcti.core.tokens import TEMPLATES

    text = " ".join([*TEMPLATES, *EXTRA_TEMPLATES, *concept_names, GENERIC_WORD, *TINY_WORDS])
    words = re.findall(r"[a-z]+", text.lower().replace("{}", " "))
    return sorted(set(words))


@dataclass
class Corpus:
    pixels: "object"  # (N, 1, H, W) float16 in [-1, 1] (grey; expanded to RGB on use)
    concept: "object"  # (N,) long: global concept id
    flip_ok: "object"  # (N,) bool
    names: list[str]  # concept names, by global id
    source: list[str]  # dataset of each concept


def to_pixels(split, indices, size: int):
    """Grey uint8 images -> (N, 1, size, size) float in [-1, 1], through the same PNG-size and
    resize path (`realdata.write_folder` at 28 px, then `mcti.data.pil_to_tensor`) as eval."""
    import torch
    from PIL import Image

    from mcti.data.folders import pil_to_tensor

    out = torch.empty(len(indices), 1, size, size)
    for j, i in enumerate(indices.tolist() if hasattr(indices, "tolist") else indices):
        im = Image.fromarray(split.images[i])
        if im.size != (28, 28):
            im = im.resize((28, 28), Image.BICUBIC)
        out[j] = pil_to_tensor(im, size)[:1]
    return out


def build_corpus(a: PretrainArgs, limit_per_class: int = 0) -> tuple[Corpus, dict]:
    """Pretraining images of every seen class of the chosen datasets, with concept ids."""
    import torch

    from mcti.data.offline import FLIP_OK, load_split

    px, cid, flip, names, source, splits = [], [], [], [], [], {}
    for ds in [d.strip() for d in a.datasets.split(",") if d.strip()]:
        s = load_split(ds)
        splits[ds] = s
        for k in s.seen:
            idx = s.pretrain[s.labels[s.pretrain] == k]
            if limit_per_class:
                idx = idx[:limit_per_class]
            px.append(to_pixels(s, idx, a.resolution).half())
            cid.append(torch.full((len(idx),), len(names), dtype=torch.long))
            flip.append(torch.full((len(idx),), FLIP_OK[ds], dtype=torch.bool))
            names.append(s.names[k])
            source.append(ds)
    if not names:
        raise UserError("--datasets selected no seen classes")
    return Corpus(torch.cat(px), torch.cat(cid), torch.cat(flip), names, source), splits


def build_parts(a: PretrainArgs, vocab: list[str]) -> dict:
    """Freshly initialised tokenizer, CLIPModel, UNet and scheduler (seeded)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from mcti.core.tiny import build_clip_tokenizer

    tiny = a.quick
    tokenizer = build_clip_tokenizer(vocab)
    tokenizer.model_max_length = MAX_TOKENS
    d = 32 if tiny else 64
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=d,
        intermediate_size=4 * d,
        num_hidden_layers=2 if tiny else 3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=d,
    )
    vis_d = 32 if tiny else 96
    vision_cfg = CLIPVisionConfig(
        image_size=a.resolution,
        patch_size=max(1, a.resolution // 4),
        hidden_size=vis_d,
        intermediate_size=4 * vis_d,
        num_hidden_layers=2 if tiny else 4,
        num_attention_heads=4,
        projection_dim=d,
    )
    torch.manual_seed(a.seed)
    clip = CLIPModel(
        CLIPConfig(
            text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict(), projection_dim=d
        )
    )
    ch = tuple(int(c) for c in a.channels.split(","))
    n = len(ch)
    unet = UNet2DConditionModel(
        sample_size=a.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=ch,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=d,
        attention_head_dim=4,  # diffusers: this is the number of heads
        norm_num_groups=min(16, ch[0]),
        addition_embed_type="text",  # pooled text -> time embedding: a global class signal
        addition_embed_type_num_heads=4,
    )
    # Pixel-space DDPM's linear betas (SD's scaled_linear leaves too much signal at t=T in
    # pixel space).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
    )
    return dict(tokenizer=tokenizer, clip=clip, unet=unet, scheduler=scheduler)


def tokenize(tokenizer, prompts: list[str]):
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=MAX_TOKENS,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def text_features(clip, ids, eos_id: int):
    """(P, L) ids -> hidden (P, L, d), projected normalised pooled (P, p): pooled at first EOS."""
    import torch

    hidden = clip.text_model(input_ids=ids).last_hidden_state
    eos = (ids == eos_id).int().argmax(dim=1)
    pooled = hidden[torch.arange(len(ids)), eos]
    return hidden, torch.nn.functional.normalize(clip.text_projection(pooled), dim=-1)


def image_features(clip, pixels):
    """Same computation as ModelBundle.clip_image_features, with gradients."""
    import torch

    from mcti.core.model import CLIP_MEAN, CLIP_STD

    size = clip.config.vision_config.image_size
    x = (pixels.float() + 1) / 2
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic")
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    pooled = clip.vision_model(pixel_values=(x - mean) / std).pooler_output
    return torch.nn.functional.normalize(clip.visual_projection(pooled), dim=-1)


def _batch_pixels(corpus: Corpus, idx, gen):
    """(B,) indices -> (B, 3, H, W) float, with random flips where the class allows them."""
    import torch

    x = corpus.pixels[idx].float()
    f = (torch.rand(len(idx), generator=gen) < 0.5) & corpus.flip_ok[idx]
    x = torch.where(f.view(-1, 1, 1, 1), x.flip(-1), x)
    return x.expand(-1, 3, -1, -1)


def _sample_balanced(corpus: Corpus, n: int, gen):
    """n image indices: concept uniform, then an image of it (datasets differ 100x in size)."""
    import torch

    K = len(corpus.names)
    if not hasattr(corpus, "_by_concept"):
        order = corpus.concept.argsort(stable=True)
        counts = torch.bincount(corpus.concept, minlength=K)
        corpus._by_concept = (order, counts, counts.cumsum(0) - counts)
    order, counts, starts = corpus._by_concept
    c = torch.randint(K, (n,), generator=gen)
    off = (torch.rand(n, generator=gen) * counts[c]).long()
    return order[starts[c] + off]


def train_clip(a: PretrainArgs, parts: dict, corpus: Corpus, log, bar) -> None:
    import math

    import torch

    clip, tok = parts["clip"], parts["tokenizer"]
    caps = [captions_for(n) for n in corpus.names]
    nT = len(caps[0])
    ids = tokenize(tok, [c for cs in caps for c in cs])  # (K * nT, L)
    gen = torch.Generator().manual_seed(a.seed + 1)
    opt = torch.optim.AdamW(clip.parameters(), lr=a.clip_lr, weight_decay=0.1)
    clip.train()
    t0 = time.perf_counter()
    for step in range(1, a.clip_steps + 1):
        lr = a.clip_lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / a.clip_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = _sample_balanced(corpus, a.clip_batch_size, gen)
        c = corpus.concept[idx]
        x = _batch_pixels(corpus, idx, gen).to(a.device)
        j = torch.randint(nT, (len(idx),), generator=gen)
        img = image_features(clip, x)
        _, txt = text_features(clip, ids[c * nT + j].to(a.device), tok.eos_token_id)
        logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B)
        same = (c.view(-1, 1) == c.view(1, -1)).float().to(a.device)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (
            torch.sum(-target * logits.log_softmax(1), 1).mean()
            + torch.sum(-target * logits.T.log_softmax(1), 1).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 50 == 0 or step == a.clip_steps:
            log(
                {
                    "stage": "clip",
                    "step": step,
                    "loss": round(loss.item(), 5),
                    "lr": lr,
                    "elapsed_s": round(time.perf_counter() - t0, 1),
                }
            )
    clip.eval()
    clip.requires_grad_(False)


def text_encoder_of(clip):
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    te.load_state_dict(clip.text_model.state_dict())
    te.eval().requires_grad_(False)
    return te


def caption_bank(parts: dict, corpus: Corpus, text_encoder):
    """Hidden states of every caption, computed once with the frozen text tower:
    rows k * nT + j (concept k, template j), then nT generic-word captions, then ""."""
    import torch

    tok = parts["tokenizer"]
    caps = [c for n in corpus.names for c in captions_for(n)] + captions_for(GENERIC_WORD) + [""]
    with torch.no_grad():
        hidden = torch.cat(
            [
                text_encoder(input_ids=tokenize(tok, caps[i : i + 256])).last_hidden_state
                for i in range(0, len(caps), 256)
            ]
        )
    return hidden, len(captions_for(GENERIC_WORD))


def make_bundle(parts: dict, unet, text_encoder, device: str = "cpu"):
    """A ModelBundle over in-memory modules (for periodic evaluation)."""
    import torch

    from mcti.core.model import ModelBundle, fingerprint_of

    return ModelBundle(
        tokenizer=parts["tokenizer"],
        text_encoder=text_encoder,
        unet=unet,
        scheduler=parts["scheduler"],
        vae=None,
        clip=parts["clip"],
        spec="pretraining",
        fingerprint=fingerprint_of(text_encoder, unet, parts["tokenizer"]),
        device=torch.device(device),
        dtype=torch.float32,
    )


def true_name_classifier(
    bundle, names: list[str], scorer: str = "diffusion", template: str = "a photo of a {}", **kw
):
    """The core Classifier with each class's conditioning taken from its true name (the
    zero-shot upper reference; the few-shot method never sees names)."""
    import torch

    from mcti.core.scoring import Classifier
    from mcti.core.tokens import TokenSet, TokenTable

    tokens = TokenSet(bundle, len(names))
    table = TokenTable(len(names), 1, torch.zeros(bundle.hidden_size)).to(bundle.device)
    clf = Classifier(bundle, tokens, table, scorer=scorer, template=template, **kw)
    with torch.no_grad():
        hidden, pooled = tokens.encode(None, [template.format(n) for n in names])
        if clf.clip is not None:
            clip = bundle.require_clip()
            clf.clip.text = torch.nn.functional.normalize(clip.text_projection(pooled), dim=-1)
        if scorer != "clip":
            clf.diffusion.cond = hidden
    return clf


def true_name_accuracy(
    bundle,
    splits: dict,
    per_class: int,
    scorer: str,
    n_samples: str = "8",
    to_keep: str = "1",
    seed: int = 0,
    classes: str = "seen",
    batch: int = 16,
    progress=None,
) -> dict:
    """Accuracy with true class names as prompts, per dataset, on held-out images of its seen
    (or novel) classes, among those classes only. Returns {dataset: acc, 'mean': ...}."""
    import torch

    from mcti.data.offline import held_out_sample

    out, n_all, c_all = {}, 0, 0
    for ds, s in splits.items():
        ks = s.seen if classes == "seen" else s.novel
        if len(ks) < 2:
            continue
        idx = held_out_sample(s, ks, per_class, seed=seed + 7)
        x = to_pixels(s, idx, bundle.resolution).expand(-1, 3, -1, -1)
        truth = torch.tensor([ks.index(int(y)) for y in s.labels[idx]])
        kw = {} if scorer == "clip" else dict(n_samples=n_samples, to_keep=to_keep, seed=seed)
        clf = true_name_classifier(bundle, [s.names[k] for k in ks], scorer, **kw)
        preds = []
        it = range(0, len(x), batch)
        for i in progress(it, desc=f"{scorer} {ds}") if progress else it:
            preds.append(clf.score(x[i : i + batch]).ranking()[:, 0])
        pred = torch.cat(preds)
        out[ds] = round(float((pred == truth).float().mean()), 4)
        n_all += len(idx)
        c_all += int((pred == truth).sum())
    out["mean"] = round(sum(v for k, v in out.items()) / max(1, len(out)), 4)
    out["pooled"] = round(c_all / max(1, n_all), 4)
    return out


def save_dir(parts: dict, unet, text_encoder, out: Path, extra: dict | None = None) -> None:
    """Write a loadable diffusers directory (no vae/) + clip/, atomically (tmp dir + rename)."""
    from mcti.atomic import atomic_write_json

    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    parts["tokenizer"].save_pretrained(tmp / "tokenizer")
    parts["scheduler"].save_pretrained(tmp / "scheduler")
    parts["clip"].save_pretrained(tmp / "clip", safe_serialization=True)
    import diffusers

    atomic_write_json(
        tmp / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": [None, None],
        },
    )
    if extra is not None:
        atomic_write_json(tmp / "pretrain.json", extra)
    # swap the model parts in (OUT may also hold checkpoint/, snapshots/, the log)
    out.mkdir(parents=True, exist_ok=True)
    for p in tmp.iterdir():
        dst = out / p.name
        if dst.is_dir():
            shutil.rmtree(dst)
        p.replace(dst)
    tmp.rmdir()


def run(a: PretrainArgs) -> None:
    import copy

    import torch
    from tqdm import tqdm

    from mcti.atomic import atomic_write

    if a.quick:
        a = _quick(a)
    if a.steps < 1 or a.clip_steps < 0 or a.batch_size < 2 or a.clip_batch_size < 2:
        raise UserError("need --steps >= 1, --clip-steps >= 0 and batch sizes >= 2")
    if a.resolution < 8 or a.resolution % 4:
        raise UserError("--resolution must be a multiple of 4, >= 8")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    ckpt_path = out / "checkpoint" / "state.pt"
    if ckpt_path.exists() and not a.resume:
        raise UserError(f"'{out}' holds a checkpoint: pass --resume or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "pretrain_log.jsonl"

    def log(rec: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    t_start = time.perf_counter()
    corpus, splits = build_corpus(a, limit_per_class=40 if a.quick else 0)
    parts = build_parts(
        a, build_vocab(corpus.names + [n for s in splits.values() for n in s.names])
    )
    clip, unet = parts["clip"].to(a.device), parts["unet"].to(a.device)
    n_params = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "text_encoder": sum(p.numel() for p in clip.text_model.parameters()),
        "clip_vision+proj": sum(
            p.numel() for n, p in clip.named_parameters() if not n.startswith("text_model")
        ),
    }
    recipe = {
        "args": asdict(a),
        "concepts": corpus.names,
        "concept_datasets": corpus.source,
        "n_pretrain_images": len(corpus.concept),
        "novel_classes": {ds: [s.names[k] for k in s.novel] for ds, s in splits.items()},
        "params": n_params,
        "torch_threads": torch.get_num_threads(),
    }
    state = torch.load(ckpt_path, weights_only=False) if (a.resume and ckpt_path.exists()) else None
    timing = {"clip_s": 0.0, "unet_s": 0.0, "eval_s": 0.0}
    curve: list[dict] = []
    if state is not None:
        clip.load_state_dict(state["clip"])
        clip.eval().requires_grad_(False)
        timing, curve = state["timing"], state["curve"]
    else:
        bar = tqdm(total=a.clip_steps, desc="pretrain clip", unit="step", disable=a.quiet)
        t0 = time.perf_counter()
        train_clip(a, parts, corpus, log, bar)
        bar.close()
        timing["clip_s"] = round(time.perf_counter() - t0, 1)
    text_encoder = text_encoder_of(clip).to(a.device)
    bank, n_generic = caption_bank(parts, corpus, text_encoder)  # (Ncap, L, d)
    nT = len(captions_for(GENERIC_WORD))
    K = len(corpus.names)

    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=a.lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(a.seed + 2)
    step = 0
    if state is not None and "unet" in state:
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["rng"])
        step = state["step"]
    alphas = parts["scheduler"].alphas_cumprod.float().to(a.device)
    T = parts["scheduler"].config.num_train_timesteps

    def evaluate_now() -> None:
        t0 = time.perf_counter()
        bundle = make_bundle(parts, ema, text_encoder, a.device)
        rec = {
            "step": step,
            "train_min": round((timing["clip_s"] + timing["unet_s"]) / 60, 2),
            "diffusion": true_name_accuracy(
                bundle, splits, max(1, a.eval_images // 8), "diffusion", "8", "1"
            ),
            "clip": true_name_accuracy(bundle, splits, 25, "clip"),
        }
        timing["eval_s"] += time.perf_counter() - t0
        rec["eval_s"] = round(time.perf_counter() - t0, 1)
        curve.append(rec)
        log({"stage": "eval", **rec})
        if a.snapshots:
            save_dir(
                parts,
                ema,
                text_encoder,
                out / "snapshots" / f"step-{step:06d}",
                {**recipe, "steps_done": step, "timing": timing, "curve": curve},
            )

    def save_ckpt() -> None:
        st = {
            "clip": clip.state_dict(),
            "unet": unet.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "rng": gen.get_state(),
            "step": step,
            "timing": timing,
            "curve": curve,
        }
        atomic_write(ckpt_path, lambda tmp: torch.save(st, tmp))

    if state is None and a.eval_every:
        evaluate_now()  # step 0: the untrained denoiser (chance level)
    bar = tqdm(total=a.steps, initial=step, desc="pretrain unet", unit="step", disable=a.quiet)
    unet.train()
    warmup = min(200, max(1, a.steps // 10))
    t_seg = time.perf_counter()
    while step < a.steps:
        if a.minutes and timing["unet_s"] + time.perf_counter() - t_seg > a.minutes * 60:
            break
        idx = _sample_balanced(corpus, a.batch_size, gen)
        x0 = _batch_pixels(corpus, idx, gen).to(a.device)  # (B, 3, H, W)
        B = len(idx)
        r = torch.rand(B, generator=gen)
        j = torch.randint(nT, (B,), generator=gen)
        cap = corpus.concept[idx] * nT + j
        cap = torch.where(r < a.generic_captions + a.caption_dropout, K * nT + j, cap)
        cap = torch.where(r < a.caption_dropout, torch.full_like(cap, len(bank) - 1), cap)
        t = torch.randint(T, (B,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(a.device)
        ab = alphas[t.to(a.device)].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        pred = unet(x_t, t.to(a.device), encoder_hidden_states=bank[cap].to(a.device)).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        d = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - d)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 25 == 0:
            now = time.perf_counter()
            timing["unet_s"] += now - t_seg
            t_seg = now
            log(
                {
                    "stage": "unet",
                    "step": step,
                    "loss": round(loss.item(), 5),
                    "unet_s": round(timing["unet_s"], 1),
                }
            )
        if a.eval_every and step % a.eval_every == 0:
            timing["unet_s"] += time.perf_counter() - t_seg
            evaluate_now()
            save_ckpt()
            unet.train()
            t_seg = time.perf_counter()
    timing["unet_s"] += time.perf_counter() - t_seg
    bar.close()
    if a.eval_every and (not curve or curve[-1]["step"] != step):
        evaluate_now()
    save_ckpt()
    timing = {k: round(v, 1) for k, v in timing.items()}
    timing["total_s"] = round(time.perf_counter() - t_start, 1)
    info = {
        **recipe,
        "steps_done": step,
        "timing": timing,
        "curve": curve,
        "reproduce": f"mcti pretrain --out DIR --steps {step} --seed {a.seed}",
    }
    save_dir(parts, ema, text_encoder, out, info)
    print(
        f"wrote the model to {out} ({step} denoiser steps, "
        f"{sum(n_params.values()) / 1e6:.2f}M parameters, {timing['total_s'] / 60:.1f} min)"
    )
    if curve:
        last = curve[-1]
        print(
            f"true-name accuracy (held-out seen classes): diffusion {last['diffusion']['pooled']:.1%}, "
            f"clip {last['clip']['pooled']:.1%}"
        )


def measure(
    model_dir: str | Path,
    per_class: int = 20,
    n_samples: str = "8,16,32",
    to_keep: str = "5,2,1",
    seed: int = 0,
    progress=None,
) -> dict:
    """True-name accuracy of a saved model on held-out images: seen classes (the quality bar)
    and, for information, novel classes (names never seen in pretraining)."""
    from mcti.core.model import load_model
    from mcti.data.offline import load_split

    bundle = load_model(str(model_dir), device="cpu")
    info = json.loads((Path(model_dir) / "pretrain.json").read_text())
    splits = {ds: load_split(ds) for ds in info["args"]["datasets"].split(",")}
    kw = dict(n_samples=n_samples, to_keep=to_keep, seed=seed, progress=progress)
    return {
        "per_class": per_class,
        "schedule": {"n_samples": n_samples, "to_keep": to_keep},
        "seen": {
            "diffusion": true_name_accuracy(bundle, splits, per_class, "diffusion", **kw),
            "clip": true_name_accuracy(bundle, splits, per_class, "clip", progress=progress),
        },
        "novel": {
            "diffusion": true_name_accuracy(
                bundle, splits, per_class, "diffusion", classes="novel", **kw
            ),
            "clip": true_name_accuracy(bundle, splits, per_class, "clip", classes="novel"),
        },
    }


def sha256sums(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root except SHA256SUMS."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "SHA256SUMS"
    }


def write_sums(root: Path) -> None:
    from mcti.atomic import atomic_write

    text = "".join(f"{h}  {n}\n" for n, h in sha256sums(root).items())
    atomic_write(root / "SHA256SUMS", lambda tmp: Path(tmp).write_text(text))


MODEL_PARTS = ("model_index.json", "unet", "text_encoder", "tokenizer", "scheduler", "clip")


def ship(src: str | Path, dst: str | Path, measured: dict, notes: str = "") -> None:
    """Copy a pretrained model (parts + pretrain.json) to dst, with MODEL_CARD.md and
    SHA256SUMS; `measured` is what `measure` returned for it."""
    from mcti.atomic import atomic_write, atomic_write_json

    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for p in MODEL_PARTS:
        (shutil.copytree if (src / p).is_dir() else shutil.copy2)(src / p, dst / p)
    info = json.loads((src / "pretrain.json").read_text())
    info["measured"] = measured
    atomic_write_json(dst / "pretrain.json", info)
    card = model_card(info, notes, sha256sums(dst))
    atomic_write(dst / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(card))
    write_sums(dst)


def model_card(info: dict, notes: str = "", sums: dict | None = None) -> str:
    a, t, m = info["args"], info["timing"], info["measured"]
    params = info["params"]
    n_total = sum(params.values())
    ds = a["datasets"].split(",")
    lines = [
        "# mcti embedded model",
        "",
        "A small model of the Stable Diffusion architecture, trained from scratch on this",
        "project's CPU by `mcti pretrain` (mcti/pretrain/__init__.py), shipped so that `mcti demo` and",
        "`--model embedded` work offline. Pixel space (no VAE): "
        f"{a['resolution']}x{a['resolution']} RGB.",
        "",
        "## Parts and parameters",
        "",
        "| part | class | parameters |",
        "|---|---|---|",
        f"| unet/ | diffusers UNet2DConditionModel, channels {a['channels']}, cross-attention at every "
        f"resolution, pooled text added to the time embedding | {params['unet']:,} |",
        f"| text_encoder/ | transformers CLIPTextModel (= clip/'s text tower) | {params['text_encoder']:,} |",
        f"| clip/ | transformers CLIPModel: + ViT vision tower and projections | "
        f"{params['clip_vision+proj']:,} (besides the text tower) |",
        "| tokenizer/ | CLIPTokenizer, byte-level BPE: 256 bytes + caption words | - |",
        "| scheduler/ | DDPMScheduler, 1000 steps, linear betas 1e-4..0.02, epsilon | - |",
        "",
        f"Total distinct parameters: {n_total:,} ({n_total / 1e6:.2f} M).",
        "",
        "## Data (offline, public) and what is held out",
        "",
        f"Datasets: {', '.join(ds)} (see mcti/data/offline.py; split seed `mcti.data.offline.SPLIT_SEED`).",
        f"Concepts in pretraining ({len(info['concepts'])}): {', '.join(info['concepts'])}.",
        "",
        "Novel classes, never in pretraining (not even their names): "
        + "; ".join(f"{d}: {', '.join(v) or '-'}" for d, v in info["novel_classes"].items())
        + ".",
        "",
        "Held-out images of seen classes, never in pretraining: animal-mnist 200 per class "
        "(seeded), Fashion-MNIST its official test split (1000 per class), digits 50 per class "
        "(seeded). Every evaluation and the demo draw only from held-out images.",
        f"Pretraining images: {info['n_pretrain_images']:,}; concepts sampled uniformly.",
        "",
        "Captions name the concept the way web captions do: the 13 `mcti.core.tokens.TEMPLATES` and 5",
        "drawing-style templates ('a silhouette of a {}', ...), e.g. 'a photo of a sneaker'; "
        f"{a['generic_captions']:.0%} of captions use the generic word 'object' instead of the "
        f"name and {a['caption_dropout']:.0%} are empty (for classifier-free guidance).",
        "",
        "## Recipe",
        "",
        f"1. CLIP, contrastive: {a['clip_steps']} steps, batch {a['clip_batch_size']}, AdamW "
        f"lr {a['clip_lr']} cosine, soft targets (all captions of the same concept are positives).",
        f"2. Denoiser, text tower frozen: {info['steps_done']} steps, batch {a['batch_size']}, "
        f"AdamW lr {a['lr']} (200 warm-up steps, then constant), grad-clip 1, EMA "
        f"{a['ema']} (saved weights), uniform timesteps, epsilon loss; random horizontal flips "
        "(not for digits).",
        f"Seed {a['seed']}, torch threads {info['torch_threads']}, CPU.",
        "",
        f"Time: CLIP {t['clip_s'] / 60:.1f} min, denoiser {t['unet_s'] / 60:.1f} min, periodic "
        f"evaluation {t['eval_s'] / 60:.1f} min (one core of a shared 2-core machine).",
        "",
        "Reproduce (same seed and thread count):",
        "",
        "```",
        f"mcti pretrain --out DIR --steps {info['steps_done']} --seed {a['seed']} --threads 1",
        "```",
        "",
        "## Quality: true class names as prompts, held-out images",
        "",
        f"{m['per_class']} held-out images per class; each dataset's classes scored among "
        "themselves. Diffusion classifier: schedule n_samples "
        f"{m['schedule']['n_samples']} / to_keep {m['schedule']['to_keep']}.",
        "",
        "| classes | scorer | " + " | ".join(ds) + " | mean | pooled |",
        "|---|---|" + "---|" * (len(ds) + 2),
    ]
    for group in ("seen", "novel"):
        for scorer in ("diffusion", "clip"):
            r = m[group][scorer]
            cells = [f"{r[d]:.1%}" if d in r else "-" for d in ds]
            lines.append(
                f"| {group} | {scorer} | "
                + " | ".join(cells)
                + f" | {r['mean']:.1%} | {r['pooled']:.1%} |"
            )
    lines += [
        "",
        "Novel classes' names were never seen in pretraining, so their true-name numbers show",
        "what names alone cannot do; the few-shot method learns tokens for them from images.",
        "",
        "## Accuracy against pretraining time (periodic, cheap: 8 timesteps, few images)",
        "",
        "| denoiser step | minutes (CLIP + denoiser) | diffusion (seen, pooled) | clip (seen, pooled) |",
        "|---|---|---|---|",
    ]
    for c in info["curve"]:
        lines.append(
            f"| {c['step']} | {c['train_min']:.1f} | {c['diffusion']['pooled']:.1%} | {c['clip']['pooled']:.1%} |"
        )
    lines += ["", "## Files", "", "SHA256SUMS lists every file (this card included):", ""]
    lines += [f"- `{n}` sha256 `{h}`" for n, h in (sums or {}).items()]
    lines.append("")
    if notes:
        lines += ["## Notes", "", notes, ""]
    return "\n".join(lines) + "\n"
