"""Global-batch draws, rank shards, hard-negative weights, and what DeepSpeed is given."""

import pytest
import torch

from mcti.core.objectives import sample_negatives, shard_draws
from mcti.core.tokens import TokenTable
from mcti.train.loop import prepare
from tests.training.conftest import small_args
from training.trainer import SimilarityRows, TokenModule, draw_batch


@pytest.fixture(scope="module")
def prepared(data_dir, tiny_bundle, tmp_path_factory):
    args = small_args(data_dir, tmp_path_factory.mktemp("o"), shots=4)  # 12 shots
    return prepare(args, tiny_bundle, quiet=True)


def test_every_rank_draws_the_same_batch_and_takes_a_disjoint_slice(prepared):
    a = draw_batch(prepared, 8, torch.Generator().manual_seed(5))
    b = draw_batch(prepared, 8, torch.Generator().manual_seed(5))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(set(a["idx"].tolist())) == 8  # no shot twice in a step (8 <= 12 shots)
    shards = [shard_draws(a, r, 4) for r in range(4)]  # 2 ranks x 2 micro-batches
    assert sorted(i for s in shards for i in s["idx"].tolist()) == sorted(a["idx"].tolist())
    for s in shards:
        assert len(s["idx"]) == 2
        assert torch.equal(s["labels"], prepared.labels[s["idx"]])
        assert all(len(v) == 2 for v in s.values())


def test_a_batch_larger_than_the_shots_uses_each_shot_evenly(prepared):
    idx = draw_batch(prepared, 30, torch.Generator().manual_seed(0))["idx"]
    counts = torch.bincount(idx, minlength=12)
    assert counts.min() >= 2 and counts.max() <= 3 and counts.sum() == 30


def test_similarity_rows_match_the_full_cosine_matrix():
    torch.manual_seed(0)
    table = TokenTable(5, 2, torch.zeros(3))
    with torch.no_grad():
        table.vectors.copy_(torch.randn(10, 3))
    rows = SimilarityRows.of(table, temperature=0.5)
    v = table.per_class().detach().reshape(5, 6)
    c = v - v.mean(0, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(c.unsqueeze(1), c.unsqueeze(0), dim=-1)  # (5, 5)
    full = torch.exp((cos - 1) / 0.5)
    for y in range(5):
        torch.testing.assert_close(rows[y], full[y], atol=1e-6, rtol=1e-5)


def test_hard_negatives_are_uniform_at_start_and_then_pick_similar_classes():
    init = torch.ones(4)
    table = TokenTable(4, 1, init)  # every class starts at the same word
    rows = SimilarityRows.of(table, temperature=0.1)
    assert torch.allclose(rows[0], rows[0][0].expand(4))  # no preference yet
    with torch.no_grad():  # classes 0 and 1 moved the same way, 2 and 3 elsewhere
        table.vectors.copy_(
            init + torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        )
    rows = SimilarityRows.of(table, temperature=0.1)
    gen = torch.Generator().manual_seed(0)
    negs = sample_negatives(torch.zeros(400, dtype=torch.long), 4, 1, gen, rows)  # (400, 1)
    counts = torch.bincount(negs.flatten(), minlength=4)
    assert counts[0] == 0 and counts[1] > 0.9 * 400


def test_deepspeed_sees_only_the_token_table(prepared):
    module = TokenModule(prepared)
    params = list(module.parameters())
    assert len(params) == 1 and params[0] is prepared.table.vectors
    assert list(dict(module.named_modules())) == ["", "table"]
    frozen = [
        p for m in (prepared.bundle.unet, prepared.bundle.text_encoder) for p in m.parameters()
    ]
    assert frozen and not any(p.requires_grad for p in frozen)
