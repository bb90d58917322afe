"""The token directory: save/load round trip on tiny-random, the diffusers-format file, and the
errors of read_meta/load_tokens (one line each, never a traceback)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mcti.core.store import (
    CLASSES,
    EMBEDS,
    FORMAT,
    label_index,
    load_tokens,
    read_meta,
    save_tokens,
)
from mcti.core.tokens import TokenTable
from mcti.errors import UserError

LABELS = ["sku-b", "sku-a", "sku-c"]  # not sorted: the order of the file is the order


@pytest.fixture
def saved(tmp_path, tiny_bundle):
    table = TokenTable(3, 2, torch.zeros(tiny_bundle.hidden_size))
    with torch.no_grad():
        table.vectors.normal_(generator=torch.Generator().manual_seed(0))
    save_tokens(tmp_path / "tok", table, LABELS, tiny_bundle, extra={"method": "mcti"})
    return tmp_path / "tok", table


def test_round_trip_keeps_vectors_labels_and_meta(saved, tiny_bundle):
    path, table = saved
    tokens, loaded, labels, meta = load_tokens(path, tiny_bundle)
    assert labels == LABELS and tokens.num_classes == 3 and tokens.n_vectors == 2
    torch.testing.assert_close(loaded.vectors, table.vectors, rtol=0, atol=0)
    assert not loaded.vectors.requires_grad
    assert meta["method"] == "mcti" and meta["format"] == FORMAT
    assert meta["base_model"] == {
        "spec": "tiny-random",
        "fingerprint": tiny_bundle.fingerprint,
        "hidden_size": tiny_bundle.hidden_size,
    }
    # diffusers' textual-inversion layout: one (n_vectors, d) entry per class token
    sd = load_file(str(path / EMBEDS))
    assert sorted(sd) == ["<mcti-0>", "<mcti-1>", "<mcti-2>"]
    torch.testing.assert_close(sd["<mcti-1>"], table.per_class()[1].detach())
    assert meta["classes"] == {"sku-b": "<mcti-0>", "sku-a": "<mcti-1>", "sku-c": "<mcti-2>"}
    assert label_index(labels, "sku-a") == 1


def _edit_meta(path, **changes):
    meta = json.loads((path / CLASSES).read_text())
    meta.update(changes)
    (path / CLASSES).write_text(json.dumps(meta))


def test_read_meta_errors(saved, tmp_path):
    path, _ = saved
    with pytest.raises(UserError, match="is not a token directory"):
        read_meta(tmp_path / "nothing")
    (path / CLASSES).write_text("{broken")
    with pytest.raises(UserError, match="is not valid JSON"):
        read_meta(path)
    (path / CLASSES).write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(UserError, match="unknown format 'other/9'"):
        read_meta(path)


def test_tokens_of_another_base_model_are_refused(saved, tiny_bundle):
    path, _ = saved
    meta = read_meta(path)
    _edit_meta(path, base_model={**meta["base_model"], "fingerprint": "0" * 16})
    with pytest.raises(UserError, match="were trained on base model"):
        load_tokens(path, tiny_bundle)
    _edit_meta(path, base_model={**meta["base_model"], "hidden_size": 768})
    with pytest.raises(UserError, match="have width 768"):
        load_tokens(path, tiny_bundle)


def test_an_entry_of_the_wrong_shape_is_refused(saved, tiny_bundle):
    path, _ = saved
    _edit_meta(path, n_vectors=3)
    with pytest.raises(UserError, match="missing or of the wrong shape"):
        load_tokens(path, tiny_bundle)


def test_unknown_label_names_the_labels():
    with pytest.raises(UserError, match="not in the token set \\(labels: a, b\\)"):
        label_index(["a", "b"], "c")
