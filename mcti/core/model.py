"""The frozen base model: load a diffusers-format directory (or build `tiny-random`).

A model directory is what diffusers writes for Stable Diffusion (`model_index.json`, `unet/`,
`text_encoder/`, `tokenizer/`, `scheduler/`, optional `vae/`), plus an optional `clip/` folder
holding a transformers `CLIPModel` whose text tower matches `text_encoder/` (it supplies the
vision tower and projections for the `clip` regularizer and scorer). Without `vae/` the UNet
works in pixel space.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mcti.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Every from_pretrained reads local files only: nothing is downloaded, and no process-wide
# setting (HF_HUB_OFFLINE) is changed behind the caller's back.
LOCAL = {"local_files_only": True}

CLIP_CHUNK = 64  # images per CLIP vision pass: all 5000 shots of K = 1000 at once took 740 MB


@dataclass
class ModelBundle:
    """Frozen parts of a Stable-Diffusion-style model, in eval mode, on one device."""

    tokenizer: object
    text_encoder: nn.Module
    unet: nn.Module
    scheduler: object  # a DDPMScheduler: betas, prediction type, add_noise
    vae: nn.Module | None
    clip: nn.Module | None
    spec: str
    fingerprint: str
    device: torch.device
    dtype: torch.dtype  # of the UNet and VAE; text encoder and CLIP stay fp32

    @property
    def resolution(self) -> int:
        """Image side in pixels."""
        size = self.unet.config.sample_size
        if self.vae is not None:
            size *= 2 ** (len(self.vae.config.block_out_channels) - 1)
        return size

    @property
    def hidden_size(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) what the UNet denoises."""
        pixels = pixels.to(self.device, self.dtype)
        if self.vae is None:
            return pixels.float()
        latents = self.vae.encode(pixels).latent_dist.mean
        return latents.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, H, W) in [-1, 1]."""
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        x = self.vae.decode(latents.to(self.dtype) / self.vae.config.scaling_factor).sample
        return x.float().clamp(-1, 1)

    @torch.no_grad()
    def clip_image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, P) L2-normalised CLIP image embeddings."""
        return clip_image_embeddings(self.require_clip(), pixels.to(self.device))

    @torch.no_grad()
    def clip_image_features_cpu(
        self, pixels: torch.Tensor, chunk: int = CLIP_CHUNK
    ) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, P) float CPU features, `chunk` images per pass, so the
        memory stays bounded however many images (shots, a test set) there are."""
        parts = [
            self.clip_image_features(pixels[i : i + chunk]) for i in range(0, len(pixels), chunk)
        ]
        return torch.cat(parts).float().cpu()

    def require_clip(self) -> nn.Module:
        if self.clip is None:
            raise UserError(
                f"model '{self.spec}' has no CLIP vision tower (a clip/ folder with a "
                "transformers CLIPModel); pass --clip PATH or use --reg denoise / --scorer diffusion"
            )
        return self.clip


def clip_image_embeddings(clip: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, P) L2-normalised embeddings of a transformers CLIPModel,
    with CLIP's preprocessing (bicubic resize to its input size, its mean/std); differentiable,
    so `mcti pretrain` trains the vision tower through the same code that scores with it."""
    size = clip.config.vision_config.image_size
    x = (pixels.float() + 1) / 2
    if x.shape[-2:] != (size, size):  # resizing to the same size is the identity
        x = nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    pooled = clip.vision_model(pixel_values=(x - mean) / std).pooler_output
    return nn.functional.normalize(clip.visual_projection(pooled), dim=-1)


def fingerprint_of(text_encoder: nn.Module, unet: nn.Module, tokenizer) -> str:
    """Short hash that identifies a base model by its weights (not by configs or paths, which
    change when a model is saved, moved or re-serialized): parameter names and shapes plus a
    few weight tensors."""
    h = hashlib.sha256()
    for module in (text_encoder, unet):
        for name, p in sorted(module.state_dict().items()):
            h.update(f"{name}:{tuple(p.shape)};".encode())
    h.update(str(len(tokenizer)).encode())
    for t in (
        text_encoder.get_input_embeddings().weight[:256],
        unet.conv_in.weight,
        unet.conv_out.weight,
    ):
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is available")
    return torch.device(device)


def configure_attention(unet: nn.Module, mode: str, device: torch.device) -> str:
    """Pick the UNet's attention backend; returns the one in use."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if mode not in ("auto", "sdpa", "xformers"):
        raise UserError(f"--attention must be auto, sdpa or xformers, not '{mode}'")
    has_xformers = False
    try:
        import xformers.ops  # noqa: F401

        has_xformers = True
    except Exception:
        pass
    if mode == "xformers" or (mode == "auto" and has_xformers and device.type == "cuda"):
        if device.type != "cuda" or not has_xformers:
            why = "it is not installed (pip install '.[gpu]')" if not has_xformers else "no CUDA"
            raise UserError(f"--attention xformers cannot run here: {why}; use sdpa")
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def _freeze(*modules: nn.Module | None) -> None:
    for m in modules:
        if m is not None:
            m.requires_grad_(False)
            m.eval()


def load_model(
    spec: str = "tiny-random",
    device: str = "auto",
    precision: str = "fp32",
    attention: str = "auto",
    clip_path: str | None = None,
) -> ModelBundle:
    """Load a model by spec: `tiny-random`, `embedded`, or a diffusers model directory."""
    from transformers import CLIPModel

    dev = resolve_device(device)
    if precision not in DTYPES:
        raise UserError(f"--precision must be one of {', '.join(DTYPES)}, not '{precision}'")
    if precision != "fp32" and dev.type != "cuda":
        raise UserError(f"--precision {precision} needs a CUDA device; use fp32 on CPU")
    dtype = DTYPES[precision]

    if spec == "tiny-random":
        from mcti.core.tiny import build_tiny_random

        parts = build_tiny_random()
    else:
        parts = _load_dir(Path(embedded_model_dir() if spec == "embedded" else spec))
    if clip_path is not None:
        if not (Path(clip_path) / "config.json").is_file():
            raise UserError(f"--clip {clip_path}: not a transformers CLIPModel directory")
        try:
            parts["clip"] = CLIPModel.from_pretrained(clip_path, **LOCAL)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot load --clip {clip_path}: {str(e).splitlines()[0]}") from e
    if parts["clip"] is not None:
        _check_clip_matches(parts["clip"], parts["text_encoder"])

    text_encoder, unet, vae, clip = (parts[k] for k in ("text_encoder", "unet", "vae", "clip"))
    _freeze(text_encoder, unet, vae, clip)
    fingerprint = fingerprint_of(text_encoder, unet, parts["tokenizer"])
    text_encoder.to(dev)
    unet.to(dev) if dtype == torch.float32 else unet.to(dev, dtype)
    if vae is not None:
        vae.to(dev) if dtype == torch.float32 else vae.to(dev, dtype)
    if clip is not None:
        clip.to(dev)
    configure_attention(unet, attention, dev)
    return ModelBundle(
        tokenizer=parts["tokenizer"],
        text_encoder=text_encoder,
        unet=unet,
        scheduler=parts["scheduler"],
        vae=vae,
        clip=clip,
        spec=spec,
        fingerprint=fingerprint,
        device=dev,
        dtype=dtype,
    )


def embedded_model_dir() -> Path:
    """Where the model shipped with the package lives."""
    path = Path(__file__).parents[1] / "assets" / "embedded-model"
    if not (path / "model_index.json").is_file():
        raise UserError(f"the embedded model is missing at {path}; reinstall mcti")
    return path


def _load_dir(root: Path) -> dict:
    """The parts of a diffusers model directory (+ clip/), or a one-line UserError."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    if not root.is_dir():
        raise UserError(f"model '{root}' is not a directory (nor tiny-random / embedded)")
    missing = [
        p
        for p in ("model_index.json", "unet", "text_encoder", "tokenizer", "scheduler")
        if not (root / p).exists()
    ]
    if missing:
        raise UserError(
            f"'{root}' is not a diffusers model directory: missing {', '.join(missing)}"
        )
    try:
        index = json.loads((root / "model_index.json").read_text())
        sched_cfg = DDPMScheduler.load_config(root / "scheduler", **LOCAL)
        has_vae = (root / "vae").is_dir() and index.get("vae", [None])[0] is not None
        return dict(
            tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer", **LOCAL),
            text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", **LOCAL),
            unet=UNet2DConditionModel.from_pretrained(root / "unet", **LOCAL),
            vae=AutoencoderKL.from_pretrained(root / "vae", **LOCAL) if has_vae else None,
            scheduler=DDPMScheduler.from_config(sched_cfg),
            clip=(
                CLIPModel.from_pretrained(root / "clip", **LOCAL)
                if (root / "clip").is_dir()
                else None
            ),
        )
    except (OSError, ValueError, RuntimeError) as e:  # unreadable, corrupt, or weights that
        # do not fit their config (JSONDecodeError is a ValueError)
        raise UserError(f"cannot load model '{root}': {str(e).splitlines()[0]}") from e


def _check_clip_matches(clip: nn.Module, text_encoder: nn.Module) -> None:
    want, got = text_encoder.config.hidden_size, clip.config.text_config.hidden_size
    if want != got:
        raise UserError(
            f"CLIP model's text width {got} does not match the text encoder's {want}; "
            "it must be the CLIP that the text encoder comes from"
        )


def save_model(parts: dict, out: str | Path) -> None:
    """Write components as a diffusers model directory (+ clip/), loadable by load_model."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    if parts.get("clip") is not None:
        parts["clip"].save_pretrained(out / "clip", safe_serialization=True)
