"""An extension draws its batches from every class's shots, as a run from scratch does, so each
new token gets the updates it would get there (batches of new-class images alone left the new
classes 6.7 points below scratch); the items that cannot teach a trained token are skipped, and
that skipping changes no gradient."""

from dataclasses import replace

import pytest
import torch

from mcti.settings import TrainArgs
from mcti.train.extend import old_class_images
from mcti.train.loop import (
    _loss_of,
    batch_loss,
    batch_of_shots,
    global_batch,
    prepare,
)


def prepared(old_set, tmp_path, **kw):
    _, new_data, old_tok = old_set
    cfg = TrainArgs(
        model="tiny-random", data=str(new_data), out=str(tmp_path / "o"), extend=str(old_tok),
        draws=1, batch_size=8, device="cpu", **kw,
    )  # fmt: skip
    return prepare(cfg, quiet=True)


def with_every_latent(p):
    """`p` with the latents of the frozen classes' shots too (with --reg clip an extension never
    encodes them: their items teach nothing), to compute every item of a batch."""
    old = old_class_images(p.extension.plan, p.bundle.resolution, required=True)
    pixels = torch.cat(list(old.values()))  # in the pool's order, as `prepare` appends them
    latents = torch.stack([p.bundle.encode_images(x) for x in (pixels, pixels.flip(-1))])
    return replace(p, latents=torch.cat([p.latents, latents.cpu()], dim=1))


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
    p = replace(p, decision=None)  # the objective alone (the added term: below)
    batch = batch_of_shots(p, torch.arange(len(p.labels)), torch.Generator().manual_seed(1))
    keep = p.extension.teaches(batch, reg)
    assert keep[: len(p.shot_paths)].all()  # every new-class item teaches
    if reg == "clip":  # only the true class's text gets gradient: old items teach nothing
        assert not keep[len(p.shot_paths) :].any()
    else:  # an old item teaches when a new class is among its negatives
        hits = (batch["negatives"][len(p.shot_paths) :] >= 3).any(1)
        assert torch.equal(keep[len(p.shot_paths) :], hits) and hits.any() and not hits.all()
    n_latents = len(p.labels) if reg == "denoise" else len(p.shot_paths)
    assert p.latents.shape[1] == n_latents  # only those of items that can teach
    full = grad_of(with_every_latent(p), _loss_of, batch)  # every item computed
    skipped = grad_of(p, batch_loss, batch)
    assert full.abs().sum() > 0
    torch.testing.assert_close(skipped, full, rtol=1e-4, atol=1e-7)


def test_a_batch_without_new_classes_gives_zero_gradients_not_none(old_set, tmp_path):
    """As in a scratch run where a class missed the batch, AdamW still steps its row."""
    p = prepared(old_set, tmp_path, method="ti")
    old_items = torch.arange(len(p.shot_paths), len(p.labels))[:4]
    batch = batch_of_shots(p, old_items, torch.Generator().manual_seed(2))
    loss, metrics = batch_loss(p, batch)
    loss.backward()
    assert loss.item() == 0 and set(metrics) == {"ti", "loss"}
    assert p.table.vectors.grad is not None and not p.table.vectors.grad.any()


def test_every_image_must_pick_its_class_text_among_all(old_set, tmp_path):
    """--reg clip: the scorer's decision over all K texts, for new-class images and for the
    frozen classes' images (those teach the new tokens not to take them); gradient to the
    trained rows only. --reg denoise has no such term: its logits already are one image
    against its candidate classes."""
    p = prepared(old_set, tmp_path, reg="clip", negatives=2)
    assert p.decision.frozen.tolist() == [0, 1, 2] and p.decision.trained.tolist() == [3, 4]
    old_items = torch.arange(len(p.shot_paths), len(p.labels))[:4]
    batch = batch_of_shots(p, old_items, torch.Generator().manual_seed(3))
    loss, metrics = batch_loss(p, batch)  # the objective at weight 0: the decision alone
    assert loss.item() == pytest.approx(0.1 * metrics["ce_decision"], rel=1e-5)
    loss.backward()
    assert p.table.vectors.grad.abs().sum() > 0
    p.table.vectors.grad = None
    mixed = batch_of_shots(p, torch.arange(len(p.labels)), torch.Generator().manual_seed(4))
    loss, metrics = batch_loss(p, mixed)
    keep = p.extension.teaches(mixed, "clip")
    objective = _loss_of(p, {k: v[keep] for k, v in mixed.items()})[0] * keep.float().mean()
    assert loss.item() == pytest.approx(objective.item() + 0.1 * metrics["ce_decision"], rel=1e-4)
    assert prepared(old_set, tmp_path, reg="denoise", negatives=2).decision is None
