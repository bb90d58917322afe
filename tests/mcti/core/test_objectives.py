"""MC-TI objectives vs plain references; draws shard exactly across data-parallel ranks."""

import pytest
import torch

from mcti.core.objectives import (
    Objective,
    ObjectiveSettings,
    sample_draws,
    sample_negatives,
    shard_draws,
)
from mcti.core.tokens import TEMPLATES, TokenSet, TokenTable


def test_negatives_are_distinct_and_never_the_label():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 3, 9, 5] * 10)
    neg = sample_negatives(labels, 10, 4, gen)
    assert neg.shape == (40, 4)
    assert not (neg == labels.view(-1, 1)).any()
    assert all(len(set(row.tolist())) == 4 for row in neg)
    assert set(neg.flatten().tolist()) == set(range(10))  # uniform draws reach every class
    hard = torch.zeros(10, 10)
    hard[:, 7] = 1.0  # all weight on class 7 (except where 7 is the label)
    neg = sample_negatives(torch.tensor([1, 2]), 10, 1, gen, weights=hard)
    assert neg.flatten().tolist() == [7, 7]


def test_shards_concatenate_to_the_global_batch():
    s = ObjectiveSettings(method="mcti", reg="denoise", draws=2, negatives=2)
    d = sample_draws(s, torch.arange(6) % 3, 3, (4, 2, 2), 1000, torch.Generator().manual_seed(0))
    parts = [shard_draws(d, r, 3) for r in range(3)]
    for k, v in d.items():
        assert torch.equal(torch.cat([p[k] for p in parts]), v)
    assert d["disc_t"].min() >= 50 and d["disc_t"].max() < 600


def reference_denoise_logits(bundle, tokens, table, x0, labels, d, s):
    """Plain loop: per image, draw and candidate, one UNet call; standardise; average; /tau."""
    ac = bundle.scheduler.alphas_cumprod
    B, D = d["disc_t"].shape
    logits = []
    for b in range(B):
        cands = [int(labels[b])] + d["negatives"][b].tolist()
        prompts = [tokens.prompt(k, TEMPLATES[int(d["template"][b])]) for k in cands]
        cond, _ = tokens.encode(table, prompts)
        z_sum = torch.zeros(len(cands), dtype=torch.float64)
        for j in range(D):
            t, eps = d["disc_t"][b, j], d["disc_eps"][b, j : j + 1]
            x_t = ac[t].sqrt() * x0[b : b + 1] + (1 - ac[t]).sqrt() * eps
            errs = torch.stack(
                [
                    (
                        (
                            bundle.unet(
                                x_t, t.view(1), encoder_hidden_states=cond[c : c + 1]
                            ).sample
                            - eps
                        )
                        ** 2
                    )
                    .double()
                    .mean()
                    for c in range(len(cands))
                ]
            )
            if s.standardize:
                mean, var = errs.mean(), errs.var(unbiased=False)
                errs = (errs - mean) / (var + (s.std_floor * mean) ** 2).sqrt()
            z_sum += errs
        logits.append(-z_sum / D / s.tau)
    return torch.stack(logits)


@pytest.mark.parametrize("standardize,tau", [(True, 0.7), (False, 0.002)])
def test_denoise_loss_matches_plain_loop(tiny_bundle, standardize, tau):
    K = 4
    tokens = TokenSet(tiny_bundle, K)
    table = TokenTable(K, 1, tokens.init_vector("object"))
    with torch.no_grad():
        table.vectors.normal_(generator=torch.Generator().manual_seed(2))
    s = ObjectiveSettings(
        method="mcti", reg="denoise", draws=2, negatives=2, tau=0.7, gamma=0.3, alpha=1.0
    )
    labels = torch.tensor([1, 3])
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    d = sample_draws(s, labels, K, (4, 16, 16), 1000, torch.Generator().manual_seed(5))
    loss, metrics = Objective(tiny_bundle, tokens, s).loss(table, x0, labels, d)

    ref_logits = reference_denoise_logits(tiny_bundle, tokens, table, x0, labels, d, s)
    ref_ce = torch.nn.functional.cross_entropy(ref_logits, torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        ac = tiny_bundle.scheduler.alphas_cumprod
        ti = []
        for b in range(2):
            t, eps = d["t"][b], d["eps"][b : b + 1]
            cond, _ = tokens.encode(
                table, [tokens.prompt(int(labels[b]), TEMPLATES[int(d["template"][b])])]
            )
            x_t = ac[t].sqrt() * x0[b : b + 1] + (1 - ac[t]).sqrt() * eps
            ti.append(
                (
                    (tiny_bundle.unet(x_t, t.view(1), encoder_hidden_states=cond).sample - eps) ** 2
                ).mean()
            )
        ref_ti = torch.stack(ti).mean()
    assert abs(metrics["ti"] - ref_ti.item()) < 1e-5
    assert abs(metrics["ce"] - ref_ce.item()) < 1e-4
    assert abs(loss.item() - (ref_ti.item() + 0.3 * ref_ce.item())) < 1e-4
    loss.backward()
    g = table.vectors.grad.abs().sum(1)
    used = {1, 3} | set(d["negatives"].flatten().tolist())
    assert all((g[k] > 0) == (k in used) for k in range(K))


def test_clip_term_uses_own_image_and_negative_shots(tiny_bundle):
    K = 3
    tokens = TokenSet(tiny_bundle, K)
    table = TokenTable(K, 1, tokens.init_vector("object"))
    pixels = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    embeds = tiny_bundle.clip_image_features(pixels)  # shots: 2 per class
    class_embeds, counts = embeds.view(K, 2, -1), torch.tensor([2, 2, 2])
    s = ObjectiveSettings(method="mcti", reg="clip", negatives=2, gamma=1.0)
    labels = torch.tensor([0, 2])
    d = sample_draws(s, labels, K, (4, 16, 16), 1000, torch.Generator().manual_seed(1))
    obj = Objective(tiny_bundle, tokens, s, class_embeds, counts)
    own = class_embeds[labels, 0]
    loss, m = obj.loss(table, torch.randn(2, 4, 16, 16), labels, d, image_embeds=own)
    # reference
    prompts = [
        tokens.prompt(int(y), TEMPLATES[int(d["template"][b])]) for b, y in enumerate(labels)
    ]
    text = tokens.clip_text_features(table, prompts)
    logits = []
    for b in range(2):
        imgs = [own[b]] + [
            class_embeds[n, int(sh) % 2]
            for n, sh in zip(d["negatives"][b], d["shot"][b], strict=True)
        ]
        logits.append(10 * text[b] @ torch.stack(imgs).T)
    ce = torch.nn.functional.cross_entropy(torch.stack(logits), torch.zeros(2, dtype=torch.long))
    assert abs(m["ce"] - ce.item()) < 1e-5
