"""An extension draws its batches from every class's shots, as a run from scratch does, so each
new token gets the updates it would get there (batches of new-class images alone left the new
classes 6.7 points below scratch); the items that cannot teach a trained token are skipped, and
that skipping changes no gradient."""

import pytest
import torch

from mcti.settings import TrainArgs
from mcti.train.loop import _loss_of, batch_loss, batch_of_shots, global_batch, prepare


def prepared(old_set, tmp_path, **kw):
    _, new_data, old_tok = old_set
    cfg = TrainArgs(
        model="tiny-random", data=str(new_data), out=str(tmp_path / "o"), extend=str(old_tok),
        draws=1, batch_size=8, device="cpu", **kw,
    )  # fmt: skip
    return prepare(cfg, quiet=True)


def grad_of(p, loss_fn, batch) -> torch.Tensor:
    p.table.vectors.grad = None
    loss_fn(p, batch)[0].backward()
    return p.table.vectors.grad.clone()


def test_batches_are_drawn_like_scratch_batches(old_set, tmp_path):
    """Old-class items make up the batches in proportion to their shots (3 of 5 classes)."""
    p = prepared(old_set, tmp_path, reg="clip", negatives=2)
    gen = torch.Generator().manual_seed(0)
    labels = torch.cat([global_batch(p, 8, gen)["labels"] for _ in range(50)])  # (400,)
    old_share = (labels < 3).float().mean().item()
    assert abs(old_share - 9 / 15) < 0.08  # 9 of the 15 pool shots are OLD's


@pytest.mark.parametrize("reg,negatives", [("clip", 2), ("denoise", 1)])
def test_skipping_the_items_that_teach_nothing_changes_no_gradient(
    old_set,
    tmp_path,
    reg,
    negatives,
):
    p = prepared(old_set, tmp_path, reg=reg, negatives=negatives)
    batch = batch_of_shots(p, torch.arange(len(p.labels)), torch.Generator().manual_seed(1))
    keep = p.extension.teaches(batch, reg)
    assert keep[: len(p.shot_paths)].all()  # every new-class item teaches
    if reg == "clip":  # only the true class's text gets gradient: old items teach nothing
        assert not keep[len(p.shot_paths) :].any()
    else:  # an old item teaches when a new class is among its negatives
        hits = (batch["negatives"][len(p.shot_paths) :] >= 3).any(1)
        assert torch.equal(keep[len(p.shot_paths) :], hits) and hits.any() and not hits.all()
    full = grad_of(p, _loss_of, batch)  # every item computed
    skipped = grad_of(p, batch_loss, batch)
    assert full.abs().sum() > 0
    torch.testing.assert_close(skipped, full, rtol=1e-4, atol=1e-7)


def test_a_batch_without_new_classes_gives_zero_gradients_not_none(old_set, tmp_path):
    """As in a scratch run where a class missed the batch, AdamW still steps its row."""
    p = prepared(old_set, tmp_path, reg="clip", negatives=2)
    old_items = torch.arange(len(p.shot_paths), len(p.labels))[:4]
    batch = batch_of_shots(p, old_items, torch.Generator().manual_seed(2))
    loss, metrics = batch_loss(p, batch)
    loss.backward()
    assert loss.item() == 0 and "loss" in metrics
    assert p.table.vectors.grad is not None and not p.table.vectors.grad.any()
