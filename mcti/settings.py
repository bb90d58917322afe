"""Command configurations as dataclasses. Each field's docstring is its `--help` text."""

from dataclasses import dataclass, field

DEFAULT_MODEL = "embedded"  # the base model a command uses unless told


@dataclass
class ModelArgs:
    model: str | None = None
    """Base model: a diffusers-format directory (e.g. a local Stable Diffusion 1.x/2.x copy), 'embedded' (shipped with mcti) or 'tiny-random' (tests). Default: 'embedded' for train; for commands that read tokens, the model the tokens were trained on."""
    clip: str | None = None
    """A transformers CLIPModel directory matching the text encoder (for --reg clip / --scorer clip) when the model has no clip/ folder."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda or cuda:N."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 for the frozen UNet/VAE (bf16/fp16 need CUDA); errors and losses accumulate in fp32."""
    attention: str = "auto"
    """UNet attention: auto (xformers on CUDA if installed, else PyTorch SDPA), sdpa or xformers."""


@dataclass
class TrainArgs(ModelArgs):
    data: str = ""
    """Image-folder tree DATA/<label>/<image> (labels are opaque keys, never read as text), or a benchmark `coop:<name>:<root>` (see README)."""
    out: str = ""
    """Output token directory (learned_embeds.safetensors, classes.json, checkpoint/)."""
    method: str = "mcti"
    """mcti (TI + discriminative term) or ti (plain textual inversion)."""
    reg: str = "denoise"
    """Discriminative term of mcti: denoise (per-class denoising errors) or clip (CLIP text-image)."""
    shots: int = 5
    """Training images per class, picked reproducibly by --seed."""
    steps: int = 200
    """Optimisation steps."""
    batch_size: int = 8
    """Images per step."""
    lr: float = 5e-3
    """AdamW learning rate of the token vectors."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    seed: int = 0
    """Seed for the shot pick and every random draw (runs are reproducible)."""
    n_vectors: int = 1
    """Embedding vectors per class token."""
    init_word: str = "object"
    """Generic initializer word, the same for every class (never derived from labels)."""
    negatives: int = 4
    """Negative classes sampled per image for the discriminative term."""
    draws: int = 4
    """(t, eps) draws per image for --reg denoise, shared by its candidate classes."""
    tau: float = 0.002
    """Temperature of the denoise logits: logits = -error / tau (errors are MSEs ~0.01-0.1 whose class differences are ~1e-4-1e-3); with many shots per class (16) 0.01 measured better; with --standardize use ~0.5."""
    alpha: float = 1.0
    """Weight of the TI noise-prediction loss."""
    gamma: float = 0.1
    """Weight of the discriminative cross-entropy."""
    standardize: bool = False
    """Standardise per-class errors across the candidates of each (image, t) before the softmax (measured worse on the embedded model: see benchmarks/RESULTS.md)."""
    disc_t_min: float = 0.05
    """Lowest timestep of the denoise term, as a fraction of the training timesteps."""
    disc_t_max: float = 0.6
    """Highest timestep of the denoise term, as a fraction of the training timesteps."""
    prototype: bool = False
    """--reg clip: compare with each class's mean image embedding instead of a random shot."""
    flip: float = 0.5
    """Probability of a horizontal flip of a training image."""
    save_every: int = 50
    """Write a resumable checkpoint every N steps (and at the end)."""
    resume: bool = False
    """Continue from OUT/checkpoint if it exists."""
    quiet: bool = False
    """No progress bar."""
    nproc: int = 1
    """Data-parallel processes on this machine (>1 runs the DeepSpeed trainer via torchrun)."""


@dataclass
class ScoreArgs(ModelArgs):
    tokens: str = ""
    """Token directory written by `mcti train`."""
    scorer: str = "diffusion"
    """diffusion (per-class denoising error), clip (CLIP cosine) or hybrid (clip top-m, diffusion rerank)."""
    n_samples: str = "8,16,32"
    """Diffusion scorer: cumulative (t, eps) samples per stage, comma-separated."""
    to_keep: str = "5,2,1"
    """Diffusion scorer: classes kept after each stage (last must be 1)."""
    hybrid_m: int = 10
    """Hybrid scorer: classes kept by the clip prefilter."""
    batch_rows: int = 256
    """UNet rows (image x class x t) per forward pass."""
    template: str = "a photo of a {}"
    """Prompt used for each class token."""
    seed: int = 0
    """Seed of the (t, eps) grid; scores are deterministic for a seed."""
    batch_images: int = 16
    """Images scored together (their rows share UNet passes)."""


@dataclass
class EvalArgs(ScoreArgs):
    data: str = ""
    """Labelled image-folder tree DATA/<label>/<image> (labels must be those of the tokens), or `coop:<name>:<root>` (its test split)."""
    include_train: bool = False
    """Also evaluate the images the tokens were trained on (excluded by default)."""
    limit: int = 0
    """Evaluate at most N images per class (0: all)."""
    json: bool = False
    """Print one JSON object instead of tables."""
    plot: str | None = None
    """Write a confusion-matrix PNG here."""


@dataclass
class ClassifyArgs(ScoreArgs):
    images: list[str] = field(default_factory=list, metadata={"positional": True})
    """Image files to classify."""
    top_k: int = 5
    """Labels shown per image."""
    json: bool = False
    """Print a JSON list instead of text."""


@dataclass
class GenerateArgs(ModelArgs):
    tokens: str = ""
    """Token directory written by `mcti train`."""
    label: str = ""
    """Class label (a key of classes.json) to draw."""
    out: str = ""
    """Output PNG (a grid of --n images)."""
    n: int = 4
    """Number of images."""
    prompt: str = "a photo of a {}"
    """Prompt template; {} becomes the class token."""
    steps: int = 25
    """DDIM sampling steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale (1 = none)."""
    seed: int = 0
    """Sampling seed."""


# --- pretraining (the embedded model's recipe) ---


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
    datasets: str = "animal-mnist,fashion-mnist,digits"
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
