"""On paper (issue 13, item 5): classification s/image on one H100 and the GPUs that train K
classes in a day, for an SD-1.5-sized model, from FLOPs per row and UNet rows per image.

Nothing here ran on a GPU. Every input is a flag whose default says where it comes from:
- FLOPs of one SD-1.5 UNet row (64x64x4 latents, 77 text tokens), of a TI training row (forward
  + backward into the conditioning only), of the VAE encoder on a 512x512 image, of a CLIP
  ViT-L/14 image tower at 224 px (the prefilter) and of the CLIP ViT-L text encoder (77 tokens):
  counted by torch's FlopCounterMode on the meta device (`--count` recounts them, ~30 s of CPU;
  multiply-add = 2 FLOP; attention softmax and norms not counted);
- UNet rows per image: measured by benchmarks/scale_k.py at K = 1000 (`--scale-json` reads them),
  the Diffusion Classifier's ImageNet schedule 50,100,500,1000 / 500,50,10,1 = 124,500;
- the GPU: dense bf16 peak (H100 SXM datasheet: 989 TFLOP/s) and the sustained fraction of it
  (--mfu for inference, --train-mfu for training): assumptions, not measurements;
- training: image visits per class (steps x batch / K) and the rows of one visit (TI: 1 row;
  --reg denoise adds draws x (1 + negatives) rows; the text encoder runs for 1 + negatives
  prompts, forward and backward, taken as 2x its forward).

    python benchmarks/project_gpu.py --scale-json runs/scale_k/scale_k.json
"""

import argparse
import json
import math

# The Diffusion Classifier's ImageNet schedule, n_samples 50,100,500,1000 / to_keep 500,50,10,1,
# with the reference's stage grids (grid[N//n//2::N//n], not nested): 1000 classes x 50 new t,
# 500 x 100, 50 x 400, 10 x 450 = 124,500 rows per image (its commands.md; DESIGN.md).
DC_IMAGENET_ROWS = 124_500

# Counted with --count (torch 2.13, diffusers 0.42.1, transformers 5.24.0), GFLOP per row/image.
COUNTED = {
    "unet_fwd": 803.3,
    "unet_train": 1669.2,
    "vae_encode_512": 1116.7,
    "clip_vit_l14_image": 162.0,
    "clip_text_fwd": 13.3,
}


def count_flops() -> dict[str, float]:
    """The COUNTED figures, recounted on the meta device (no weights, no compute)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from benchmarks.gpu_unet_bench import SD15

    def gflop(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15).eval().requires_grad_(False)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            sample_size=512,
        ).eval()
        vision = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                patch_size=14,
                image_size=224,
                projection_dim=768,
            )
        ).eval()
        text = CLIPTextModel(  # ViT-L/14's (SD-1.5's text encoder)
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
            )
        ).eval()
        x, t = torch.randn(1, 4, 64, 64), torch.tensor([500])
        ctx = torch.randn(1, 77, 768)
        ids = torch.zeros(1, 77, dtype=torch.long)
        image_512, image_224 = torch.randn(1, 3, 512, 512), torch.randn(1, 3, 224, 224)
        ctx_grad = torch.randn(1, 77, 768, requires_grad=True)

    def train_row() -> None:
        unet(x, t, encoder_hidden_states=ctx_grad).sample.float().square().mean().backward()

    with torch.no_grad():
        out = {
            "unet_fwd": gflop(lambda: unet(x, t, encoder_hidden_states=ctx)),
            "vae_encode_512": gflop(lambda: vae.encode(image_512)),
            "clip_vit_l14_image": gflop(lambda: vision(pixel_values=image_224)),
            "clip_text_fwd": gflop(lambda: text(input_ids=ids)),
        }
    out["unet_train"] = gflop(train_row)
    return {k: round(v, 1) for k, v in out.items()}


def rows_from_scale(path: str, k: int) -> dict[str, float]:
    """UNet rows/image of each UNet scorer at K = k in a benchmarks/scale_k.py JSON."""
    results = json.load(open(path))["results"]
    r = next((r for r in results if r["classes"] == k), None)
    if r is None:
        raise SystemExit(f"{path} has no K = {k} (has {[r['classes'] for r in results]})")
    return {
        n: s["unet_rows_per_image"] for n, s in r["scorers"].items() if s["unet_rows_per_image"]
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", action="store_true", help="recount the FLOPs on the meta device")
    p.add_argument("--scale-json", default="", help="benchmarks/scale_k.py output: rows/image")
    p.add_argument("--k", type=int, default=1000, help="classes of the classification rows")
    p.add_argument(
        "--rows",
        default="hybrid=176,diffusion=256,diffusion (full)=8096",
        help="scorer=rows/image at --k when no --scale-json (scale_k.py, K = 1000, 2026-12-02)",
    )
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    p.add_argument("--mfu", type=float, default=0.4, help="sustained fraction, inference")
    p.add_argument("--train-mfu", type=float, default=0.3, help="sustained fraction, training")
    p.add_argument(
        "--visits", default="8,160,40000", help="image visits per class (steps x batch / K)"
    )
    p.add_argument("--negatives", type=int, default=4)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--train-classes", default="1000,10000")
    a = p.parse_args()

    g = count_flops() if a.count else COUNTED
    print("GFLOP:", json.dumps(g))
    if a.scale_json:
        rows = rows_from_scale(a.scale_json, a.k)
    else:
        rows = {kv.split("=")[0]: float(kv.split("=")[1]) for kv in a.rows.split(",")}
    rows["Diffusion Classifier, ImageNet schedule"] = DC_IMAGENET_ROWS
    flops_s = a.peak_tflops * 1e12 * a.mfu

    print(f"\n### Classification on one H100 (K = {a.k}; {a.peak_tflops:g} TFLOP/s x {a.mfu:g})\n")
    print("| scorer | UNet rows/image | TFLOP/image | s/image | images/s |")
    print("|---|---|---|---|---|")
    for name, n in rows.items():
        per_image = g["vae_encode_512"]  # every diffusion scorer encodes the image once
        if name != "Diffusion Classifier, ImageNet schedule" and name != "diffusion (full)":
            per_image += g["clip_vit_l14_image"]  # the clip prefilter
        tflop = (n * g["unet_fwd"] + per_image) / 1e3
        sec = tflop * 1e12 / flops_s
        print(f"| {name} | {n:,.0f} | {tflop:,.1f} | {sec:.3g} | {1 / sec:.3g} |")
    clip_s = (g["clip_vit_l14_image"] * 1e9) / flops_s
    print(f"| clip / fused (ViT-L/14 image tower + a (K, 768) matrix product) | 0 | "
          f"{g['clip_vit_l14_image'] / 1e3:.2f} | {clip_s:.2g} | {1 / clip_s:,.0f} |")  # fmt: skip

    train_flops = a.peak_tflops * 1e12 * a.train_mfu
    text = 2 * g["clip_text_fwd"] * (1 + a.negatives)  # forward + backward, 1 + negatives prompts
    visit = {
        "--reg clip (1 UNet row)": g["unet_train"] + text,
        f"--reg denoise ({1 + a.draws * (1 + a.negatives)} UNet rows)": (
            (1 + a.draws * (1 + a.negatives)) * g["unet_train"] + text
        ),
    }
    print(f"\n### Training in a day ({a.peak_tflops:g} TFLOP/s x {a.train_mfu:g} per GPU)\n")
    print("| objective | GFLOP/visit | visits/class | classes | GPU-hours | GPUs for 24 h |")
    print("|---|---|---|---|---|---|")
    for name, gf in visit.items():
        for v in [int(x) for x in a.visits.split(",")]:
            for k in [int(x) for x in a.train_classes.split(",")]:
                hours = k * v * gf * 1e9 / train_flops / 3600
                print(f"| {name} | {gf:,.0f} | {v:,} | {k:,} | {hours:,.2f} | {max(1, math.ceil(hours / 24))} |")  # fmt: skip


if __name__ == "__main__":
    main()
