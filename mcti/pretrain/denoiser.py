"""Stage 2: the pixel-space UNet trained on the noise-prediction loss, conditioned on the
frozen text tower's hidden states of the captions; EMA of weights (what is saved); a few
captions say the generic word instead of the name, and a few are empty (so the classifier-free
"" prompt exists for sampling). The LR is constant after warm-up, so stopping after N steps
gives exactly the model that `--steps N` reproduces."""

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mcti.core.diffusion import add_noise
from mcti.core.tokens import tokenize
from mcti.pretrain.corpus import GENERIC_WORD, Corpus, batch_pixels, captions_for, sample_balanced
from mcti.pretrain.networks import MAX_TOKENS
from mcti.settings import PretrainArgs


def caption_bank(tokenizer, names: list[str], text_encoder) -> torch.Tensor:
    """Hidden states (Ncap, L, d) of every caption, computed once with the frozen text tower:
    rows k * nT + j (concept k, template j), then nT generic-word captions, then ""."""
    caps = [c for n in names for c in captions_for(n)] + captions_for(GENERIC_WORD) + [""]
    with torch.no_grad():
        return torch.cat(
            [
                text_encoder(
                    input_ids=tokenize(tokenizer, caps[i : i + 256], MAX_TOKENS)
                ).last_hidden_state
                for i in range(0, len(caps), 256)
            ]
        )


@dataclass
class Denoiser:
    """What the denoiser stage trains and resumes: UNet, its EMA, AdamW, generator, step."""

    unet: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    step: int = 0

    @classmethod
    def start(cls, a: PretrainArgs, unet: torch.nn.Module) -> "Denoiser":
        ema = copy.deepcopy(unet).eval().requires_grad_(False)
        opt = torch.optim.AdamW(unet.parameters(), lr=a.lr, weight_decay=1e-2)
        return cls(unet, ema, opt, torch.Generator().manual_seed(a.seed + 2))

    def state_dict(self) -> dict:
        return {
            "unet": self.unet.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "rng": self.gen.get_state(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["rng"])
        self.step = state["step"]


def draw_captions(a: PretrainArgs, concept: torch.Tensor, n_concepts: int, gen) -> torch.Tensor:
    """(B,) concept ids -> (B,) rows of `caption_bank`: the concept's caption with a random
    template; the generic word's with probability generic_captions; "" with caption_dropout."""
    nT = len(captions_for(GENERIC_WORD))
    r = torch.rand(len(concept), generator=gen)
    j = torch.randint(nT, (len(concept),), generator=gen)
    cap = concept * nT + j
    cap = torch.where(r < a.generic_captions + a.caption_dropout, n_concepts * nT + j, cap)
    return torch.where(r < a.caption_dropout, torch.full_like(cap, (n_concepts + 1) * nT), cap)


def train_step(a: PretrainArgs, den: Denoiser, corpus: Corpus, bank, scheduler, warmup: int):
    """One AdamW step of the epsilon loss on a balanced batch, then the EMA update."""
    gen, unet = den.gen, den.unet
    idx = sample_balanced(corpus, a.batch_size, gen)
    x0 = batch_pixels(corpus, idx, gen).to(a.device)  # (B, 3, H, W)
    cap = draw_captions(a, corpus.concept[idx], len(corpus.names), gen)  # (B,)
    t = torch.randint(scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
    eps = torch.randn(x0.shape, generator=gen).to(a.device)
    x_t, target = add_noise(scheduler, x0, t, eps)
    pred = unet(x_t, t.to(a.device), encoder_hidden_states=bank[cap].to(a.device)).sample
    loss = torch.nn.functional.mse_loss(pred, target)
    for g in den.opt.param_groups:
        g["lr"] = a.lr * min(1.0, (den.step + 1) / warmup)
    den.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    den.opt.step()
    den.step += 1
    decay = min(a.ema, (1 + den.step) / (10 + den.step))
    with torch.no_grad():
        for pe, p in zip(den.ema.parameters(), unet.parameters(), strict=True):
            pe.lerp_(p, 1 - decay)
    return loss


def train_denoiser(
    a: PretrainArgs,
    den: Denoiser,
    corpus: Corpus,
    bank: torch.Tensor,
    scheduler,
    timing: dict,
    log: Callable[[dict], None],
    evaluate: Callable[[], None],
    bar,
) -> None:
    """Train until a.steps (or a.minutes of training); `evaluate()` every a.eval_every steps.
    timing["unet_s"] accumulates training time only (evaluation time is not counted)."""
    den.unet.train()
    warmup = min(200, max(1, a.steps // 10))
    t_seg = time.perf_counter()
    while den.step < a.steps:
        if a.minutes and timing["unet_s"] + time.perf_counter() - t_seg > a.minutes * 60:
            break
        loss = train_step(a, den, corpus, bank, scheduler, warmup)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if den.step % 25 == 0:
            now = time.perf_counter()
            timing["unet_s"] += now - t_seg
            t_seg = now
            unet_s = round(timing["unet_s"], 1)
            log(
                {"stage": "unet", "step": den.step, "loss": round(loss.item(), 5), "unet_s": unet_s}
            )
        if a.eval_every and den.step % a.eval_every == 0:
            timing["unet_s"] += time.perf_counter() - t_seg
            evaluate()
            den.unet.train()
            t_seg = time.perf_counter()
    timing["unet_s"] += time.perf_counter() - t_seg
