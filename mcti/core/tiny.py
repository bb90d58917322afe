"""`tiny-random`: a tiny Stable-Diffusion-architecture model built from config, for tests.

Same parts as SD 1.x (CLIP tokenizer and text encoder, UNet2DConditionModel, DDPM scheduler,
AutoencoderKL) plus a matching CLIP model (vision tower and projections); the tokenizer is
`mcti.core.tokenizer`'s byte-level BPE over its `BASE_WORDS`. Weights are seeded, so the model
and its fingerprint are the same on every machine.
"""

import torch

from mcti.core.tokenizer import build_clip_tokenizer


def build_tiny_random(seed: int = 0) -> dict:
    """Components of the tiny model: tokenizer, text_encoder, unet, vae, scheduler, clip."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

    tokenizer = build_clip_tokenizer()
    text_cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )
    vision_cfg = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    )
    clip = CLIPModel(
        CLIPConfig(text_config=text_cfg, vision_config=vision_cfg.to_dict(), projection_dim=32)
    )
    clip.text_model.load_state_dict(text_encoder.state_dict())  # one text tower, shared
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        clip=clip,
    )
