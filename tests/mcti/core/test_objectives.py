"""MC-TI objectives vs plain references; draws shard exactly across data-parallel ranks."""

from dataclasses import replace

import pytest
import torch

from mcti.core.objectives import (
    Objective,
    ObjectiveSettings,
    ScorerDecision,
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


def spread_table(tokens: TokenSet, K: int) -> TokenTable:
    """A table whose classes' texts differ clearly (tiny-random's init word alone: all alike)."""
    table = TokenTable(K, 1, tokens.init_vector("object"))
    with torch.no_grad():
        table.vectors.normal_(generator=torch.Generator().manual_seed(3)).mul_(3)
    return table


@pytest.mark.parametrize("all_texts_max", [256, 2])  # all K texts; own class + negatives
def test_decision_gradient_reaches_only_trainable_tokens(tiny_bundle, all_texts_max):
    K = 4
    tokens = TokenSet(tiny_bundle, K)
    table = spread_table(tokens, K)
    trainable = torch.tensor([False, True, False, True])
    decision = ScorerDecision(tokens, trainable, all_texts_max)
    images = torch.nn.functional.normalize(torch.randn(3, table_dim(tokens)), dim=-1)  # (B, P)
    labels, negatives = torch.tensor([0, 1, 2]), torch.tensor([[1, 3], [0, 2], [3, 1]])
    loss, _ = decision.loss(table, images, labels, negatives)
    loss.backward()
    g = table.vectors.grad.abs().sum(1)
    assert (g[[1, 3]] > 0).all() and (g[[0, 2]] == 0).all()
    # the trainable texts are encoded afresh each call (the frozen ones once)
    with torch.no_grad():
        table.vectors[1] += torch.randn(table.vectors.shape[1])  # (a constant: LayerNorm-invariant)
    again, _ = decision.loss(table, images, labels, negatives)
    assert again.item() != loss.item()


def table_dim(tokens: TokenSet) -> int:
    return tokens.bundle.require_clip().text_projection.out_features


def test_decision_matches_the_clip_scorer_over_all_texts(tiny_bundle):
    """Logits are the clip scorer's: 10 * cos(image, class text) over every class (K small)."""
    K = 3
    tokens = TokenSet(tiny_bundle, K)
    table = spread_table(tokens, K)
    text = tokens.clip_text_features(table, [tokens.prompt(k) for k in range(K)]).float()
    images = torch.nn.functional.normalize(torch.randn(4, text.shape[1]), dim=-1)
    labels = torch.tensor([2, 0, 1, 1])
    ce, acc = ScorerDecision(tokens).loss(table, images, labels, torch.tensor([[0]] * 4))
    ref = torch.nn.functional.cross_entropy(10 * images @ text.T, labels)
    assert abs(ce.item() - ref.item()) < 1e-5
    assert acc == ((images @ text.T).argmax(1) == labels).float().mean().item()


def test_clip_reg_prefers_the_label_the_scorer_picks(tiny_bundle):
    """The image is its class 0 text's feature, so the clip scorer picks class 0. Class 1's shot
    looks like text 0 and class 0's shot unlike text 1: the text->image term alone (the old
    --reg clip) scored label 1 (wrong) lower than label 0 (right); with the scorer's decision
    the trained loss (gamma * both terms) is lower for the label the scorer picks."""
    K = 2
    tokens = TokenSet(tiny_bundle, K)
    table = spread_table(tokens, K)
    with torch.no_grad():
        text = tokens.clip_text_features(table, [tokens.prompt(k) for k in range(K)]).float()
    assert text[0] @ text[1] < 0.9  # the texts differ enough for the decision to tell them
    x = text[0:1]  # (1, P): the scorer picks class 0
    class_embeds = torch.stack([-text[1:2], text[0:1]])  # (K, S=1, P) shots
    s = ObjectiveSettings(method="mcti", reg="clip", negatives=1, gamma=1.0, alpha=0.0)
    objective = Objective(tiny_bundle, tokens, s, class_embeds, torch.tensor([1, 1]))
    decision = ScorerDecision(tokens)

    def clip_reg(label: int) -> tuple[float, float]:
        """(text->image CE, text->image + decision CE) of the image under `label`."""
        labels = torch.tensor([label])
        d = sample_draws(s, labels, K, (4, 16, 16), 1000, torch.Generator().manual_seed(0))
        d["template"] = torch.zeros(1, dtype=torch.long)  # the scorer's prompt
        with torch.no_grad():
            _, m = objective.loss(table, torch.zeros(1, 4, 16, 16), labels, d, image_embeds=x)
            ce, _ = decision.loss(table, x, labels, d["negatives"])
        return m["ce"], m["ce"] + ce.item()

    (old_right, new_right), (old_wrong, new_wrong) = clip_reg(0), clip_reg(1)
    assert old_wrong < old_right  # the old term ranks the wrong way round here
    assert new_right < new_wrong


def test_fingerprint_names_the_clip_term(tiny_bundle, tmp_path):
    """A --reg clip checkpoint of the text->image term alone has no `clip_term`: refused."""
    from mcti.errors import UserError
    from mcti.settings import TrainArgs
    from mcti.train.checkpoint import check_same_run
    from mcti.train.loop import prepare, run_fingerprint
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=2)
    bundle = tiny_bundle
    cfg = TrainArgs(data=str(data), out=str(tmp_path / "tok"), reg="clip", shots=2, quiet=True)
    fp = run_fingerprint(cfg, prepare(cfg, bundle, quiet=True))
    assert fp["clip_term"] == "scorer-decision/1"
    old = {k: v for k, v in fp.items() if k != "clip_term"}
    with pytest.raises(UserError, match="clip_term"):
        check_same_run(old, fp, tmp_path)
    denoise = replace(cfg, reg="denoise")
    assert "clip_term" not in run_fingerprint(denoise, prepare(denoise, bundle, quiet=True))


def test_decision_with_only_frozen_candidates_encodes_no_prompt(tiny_bundle):
    """Extending at large K, an old-class image whose negatives are all old classes: the
    frozen texts alone (no text encoder call with zero prompts), and no gradient."""
    K = 4
    tokens = TokenSet(tiny_bundle, K)
    table = spread_table(tokens, K)
    decision = ScorerDecision(tokens, torch.tensor([False, False, False, True]), all_texts_max=2)
    images = torch.nn.functional.normalize(torch.randn(1, table_dim(tokens)), dim=-1)
    decision.loss(table, images, torch.tensor([3]), torch.tensor([[0, 1]]))  # caches the frozen
    ce, _ = decision.loss(table, images, torch.tensor([0]), torch.tensor([[1, 2]]))
    text = decision.frozen_texts  # (3, P): classes 0, 1, 2
    ref = torch.nn.functional.cross_entropy(10 * images @ text.T, torch.tensor([0]))
    assert abs(ce.item() - ref.item()) < 1e-5 and not ce.requires_grad
