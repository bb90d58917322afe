"""Stage 1: a small CLIP (text tower + ViT vision tower) trained contrastively on (image,
caption) pairs. Images whose captions name the same concept are all positives (soft targets).
Features are computed by the same functions that score with the trained model."""

import math
import time
from collections.abc import Callable

import torch

from mcti.core.model import clip_image_embeddings
from mcti.core.tokens import pool_at_eos, project_text, tokenize
from mcti.pretrain.corpus import Corpus, batch_pixels, captions_for, sample_balanced
from mcti.pretrain.networks import MAX_TOKENS
from mcti.settings import PretrainArgs


def clip_lr(a: PretrainArgs, step: int) -> float:
    """100 warm-up steps, then cosine decay to 0 at the last step."""
    return a.clip_lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / a.clip_steps))


def soft_contrastive_loss(img: torch.Tensor, txt: torch.Tensor, concept, logit_scale):
    """img, txt (B, p) normalised; concept (B,): symmetric cross-entropy whose target spreads
    each row over every column of the same concept."""
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B)
    same = (concept.view(-1, 1) == concept.view(1, -1)).float().to(img.device)
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * logits.log_softmax(1), 1).mean()
        + torch.sum(-target * logits.T.log_softmax(1), 1).mean()
    )


def train_clip(a: PretrainArgs, parts: dict, corpus: Corpus, log: Callable, bar) -> None:
    """a.clip_steps AdamW steps on parts["clip"]; leaves it frozen in eval mode."""
    clip, tok = parts["clip"], parts["tokenizer"]
    caps = [captions_for(n) for n in corpus.names]
    nT = len(caps[0])
    ids = tokenize(tok, [c for cs in caps for c in cs], MAX_TOKENS)  # (K * nT, L)
    gen = torch.Generator().manual_seed(a.seed + 1)
    opt = torch.optim.AdamW(clip.parameters(), lr=a.clip_lr, weight_decay=0.1)
    clip.train()
    t0 = time.perf_counter()
    for step in range(1, a.clip_steps + 1):
        lr = clip_lr(a, step)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = sample_balanced(corpus, a.clip_batch_size, gen)
        c = corpus.concept[idx]
        x = batch_pixels(corpus, idx, gen).to(a.device)  # (B, 3, H, W)
        j = torch.randint(nT, (len(idx),), generator=gen)  # a caption template per image
        img = clip_image_embeddings(clip, x)  # (B, p)
        cap = ids[c * nT + j].to(a.device)  # (B, L)
        hidden = clip.text_model(input_ids=cap).last_hidden_state  # (B, L, d)
        txt = project_text(clip, pool_at_eos(hidden, cap, tok.eos_token_id))  # (B, p)
        loss = soft_contrastive_loss(img, txt, c, clip.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 50 == 0 or step == a.clip_steps:
            elapsed = round(time.perf_counter() - t0, 1)
            log(
                {
                    "stage": "clip",
                    "step": step,
                    "loss": round(loss.item(), 5),
                    "lr": lr,
                    "elapsed_s": elapsed,
                }
            )
    clip.eval()
    clip.requires_grad_(False)
