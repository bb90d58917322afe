"""How much of a UNet row does not depend on the class? (issue: "measure whether it pays")

Times, with forward hooks, the parts of a UNet2DConditionModel forward that are the same for
every class of an (image, t): the time embedding, conv_in, the first down block's first resnet,
and its first transformer's proj_in + self-attention (everything before the first
cross-attention); and the cross-attention key/value projections of the conditioning (the same
for every image: once per token set). Their share of the forward time bounds what caching them
could save.

    python benchmarks/class_independent_work.py            # tiny-random and SD-1.5-shaped UNet
"""

import argparse
import time
from collections import defaultdict

import torch


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def measure(unet, rows: int, seq: int, repeats: int) -> dict:
    unet.eval()
    spent = defaultdict(float)
    starts = {}

    def pre(name):
        return lambda m, a, k=None: starts.__setitem__(name, time.perf_counter())

    def post(name):
        return lambda m, a, o: spent.__setitem__(
            name, spent[name] + time.perf_counter() - starts[name]
        )

    first = unet.down_blocks[0]
    prefix = {
        "time_embedding": unet.time_embedding,
        "conv_in": unet.conv_in,
        "resnet0": first.resnets[0],
    }
    if hasattr(first, "attentions"):
        tb = first.attentions[0]
        prefix |= {
            "proj_in": tb.proj_in,
            "attn1": tb.transformer_blocks[0].attn1,
            "norm_in": tb.norm,
        }
    kv = {}
    for name, m in unet.named_modules():
        if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
            kv[name] = m
    handles = []
    for group, mods in (("prefix", prefix), ("kv", kv)):
        for name, m in mods.items():
            key = f"{group}:{name}"
            handles.append(m.register_forward_pre_hook(pre(key)))
            handles.append(m.register_forward_hook(post(key)))
    c = unet.config
    x = torch.randn(rows, c.in_channels, c.sample_size, c.sample_size)
    cond = torch.randn(rows, seq, c.cross_attention_dim)
    t = torch.randint(0, 1000, (rows,))
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=cond)  # warm-up
        spent.clear()
        t0 = time.perf_counter()
        for _ in range(repeats):
            unet(x, t, encoder_hidden_states=cond)
        total = time.perf_counter() - t0
    for h in handles:
        h.remove()
    pre_s = sum(v for k, v in spent.items() if k.startswith("prefix"))
    kv_s = sum(v for k, v in spent.items() if k.startswith("kv"))
    return {
        "total_s_per_row": total / repeats / rows,
        "prefix_share": pre_s / total,
        "kv_share": kv_s / total,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--sd15-rows", type=int, default=2)
    p.add_argument("--no-sd15", action="store_true")
    args = p.parse_args()
    from mcti.core.tiny import build_tiny_random

    results = {
        "tiny-random (16x16x4 latents)": measure(build_tiny_random()["unet"], args.rows, 77, 5)
    }
    if not args.no_sd15:
        torch.manual_seed(0)
        results["SD-1.5-shaped (64x64x4 latents)"] = measure(sd15_unet(), args.sd15_rows, 77, 1)
    print(f"{'UNet':<34} {'s/row':>8} {'before 1st cross-attn':>22} {'cross-attn K/V':>15}")
    for name, r in results.items():
        print(
            f"{name:<34} {r['total_s_per_row']:>8.4f} {r['prefix_share']:>22.1%} {r['kv_share']:>15.1%}"
        )


if __name__ == "__main__":
    main()
