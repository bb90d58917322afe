"""The networks pretraining builds and writes: tokenizer, CLIPModel, pixel-space UNet,
scheduler; a ModelBundle over them for evaluation; the diffusers-format output directory."""

import shutil
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

from mcti.atomic import atomic_write_json, fsync_dir
from mcti.core.model import ModelBundle, fingerprint_of
from mcti.core.tokenizer import build_clip_tokenizer
from mcti.settings import PretrainArgs

MAX_TOKENS = 24  # text length (short prompts; keeps cross-attention cheap)
MODEL_INDEX = "model_index.json"  # written last: a directory without it is no model (yet)


def build_parts(a: PretrainArgs, vocab: list[str]) -> dict:
    """Freshly initialised tokenizer, CLIPModel, UNet and scheduler (seeded)."""
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


def parameter_counts(clip: CLIPModel, unet: UNet2DConditionModel) -> dict[str, int]:
    return {
        "unet": sum(p.numel() for p in unet.parameters()),
        "text_encoder": sum(p.numel() for p in clip.text_model.parameters()),
        "clip_vision+proj": sum(
            p.numel() for n, p in clip.named_parameters() if not n.startswith("text_model")
        ),
    }


def text_encoder_of(clip: CLIPModel) -> CLIPTextModel:
    """A frozen CLIPTextModel holding the CLIP model's text tower (one tower, two wrappers)."""
    te = CLIPTextModel(clip.config.text_config)
    te.load_state_dict(clip.text_model.state_dict())
    te.eval().requires_grad_(False)
    return te


def bundle_of(parts: dict, unet, text_encoder, device: str = "cpu") -> ModelBundle:
    """A ModelBundle over in-memory modules (for periodic evaluation)."""
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


def save_model_dir(parts: dict, unet, text_encoder, out: Path, extra: dict | None = None) -> None:
    """Write a loadable diffusers directory (no vae/) + clip/ (+ pretrain.json: `extra`).

    OUT may also hold checkpoint/, snapshots/ and the log, so the parts are written to a
    temporary directory beside it and moved in one by one; `model_index.json` is removed
    first and written last, so a process killed part-way leaves a directory that
    `load_model` refuses (no model_index.json), never a mix of two models.
    """
    import diffusers

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
    if extra is not None:
        atomic_write_json(tmp / "pretrain.json", extra)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_INDEX).unlink(missing_ok=True)
    fsync_dir(out)
    for p in tmp.iterdir():
        dst = out / p.name
        if dst.is_dir():
            shutil.rmtree(dst)
        p.replace(dst)
    tmp.rmdir()
    fsync_dir(out)
    atomic_write_json(
        out / MODEL_INDEX,
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
    fsync_dir(out)
