"""Token sets as stored (mcti/core/store.py) and their edits (mcti/core/tokenset_ops.py)."""

import pytest
import torch
from safetensors.torch import load_file

from mcti.core.store import CLASS_ARRAYS, EMBEDS, FORMAT, StoredTokens, read_tokens, write_tokens
from mcti.core.tokenset_ops import history, merge, remove, rename
from mcti.errors import UserError


def stored(labels: list[str], seed: int = 0, fingerprint: str = "f1", n: int = 1, d: int = 4):
    """A set with random vectors and one per-class array ("shots": (2, 3)) per class."""
    g = torch.Generator().manual_seed(seed)
    meta = {
        "format": FORMAT,
        "base_model": {"spec": "m", "fingerprint": fingerprint, "hidden_size": d},
        "n_vectors": n,
        "classes": {},
        "method": "mcti",
        "steps": 7,
        "settings": {"lr": 0.005},
        "data_root": f"/data/{seed}",
        "train_files": [f"{x}/a.png" for x in labels],
    }
    vectors = {x: torch.randn(n, d, generator=g) for x in labels}
    arrays = {x: {"shots": torch.randn(2, 3, generator=g)} for x in labels}
    return StoredTokens(meta, vectors, arrays)


def same(a: StoredTokens, b: StoredTokens, labels: list[str]) -> None:
    for x in labels:
        assert torch.equal(a.vectors[x], b.vectors[x]), x
        assert torch.equal(a.arrays[x]["shots"], b.arrays[x]["shots"]), x


def test_write_read_round_trip_keeps_vectors_and_arrays(tmp_path):
    s = stored(["b", "a", "weird label, with comma"])
    write_tokens(tmp_path, s)
    back = read_tokens(tmp_path)
    assert back.labels == s.labels  # class order kept, not sorted
    same(s, back, s.labels)
    assert back.meta["classes"] == {"b": "<mcti-0>", "a": "<mcti-1>", "weird label, with comma": "<mcti-2>"}  # fmt: skip
    # the embeddings file holds the tokens only (diffusers' list form loads every entry)
    assert sorted(load_file(str(tmp_path / EMBEDS))) == ["<mcti-0>", "<mcti-1>", "<mcti-2>"]
    assert "<mcti-1>/shots" in load_file(str(tmp_path / CLASS_ARRAYS))
    write_tokens(tmp_path, StoredTokens(s.meta, s.vectors, {}))  # no arrays: no stale file
    assert not (tmp_path / CLASS_ARRAYS).exists()


def test_merge_keeps_every_class_with_its_arrays_and_records_history():
    a, b = stored(["x", "y"], seed=1), stored(["z"], seed=2)
    m = merge([a, b], ["A", "B"])
    assert m.labels == ["x", "y", "z"]
    same(a, m, ["x", "y"])
    same(b, m, ["z"])
    assert [h["op"] for h in m.meta["history"]] == ["train", "train", "merge"]
    assert m.meta["history"][2] == {"op": "merge", "sets": ["A", "B"], "labels": [["x", "y"], ["z"]]}  # fmt: skip
    # the top-level run fields are the first run's (what `mcti eval` reads), its files only
    assert m.meta["data_root"] == "/data/1" and m.meta["train_files"] == ["x/a.png", "y/a.png"]
    assert a.labels == ["x", "y"] and "history" not in a.meta  # inputs untouched


def test_merge_refuses_another_base_model_and_collisions():
    with pytest.raises(UserError, match=r"different base model m \(fingerprint f1.*fingerprint f2"):
        merge([stored(["x"]), stored(["y"], fingerprint="f2")], ["A", "B"])
    with pytest.raises(UserError, match="vectors per class 1 vs 2"):
        merge([stored(["x"]), stored(["y"], n=2)], ["A", "B"])
    with pytest.raises(UserError, match=r"more than one set: 'x', 'y'"):
        merge([stored(["x", "y", "w"]), stored(["y", "x"])], ["A", "B"])


def test_remove_drops_classes_with_their_arrays():
    s = stored(["x", "y", "z"])
    r = remove(s, ["y"])
    assert r.labels == ["x", "z"] and "y" not in r.arrays
    same(s, r, ["x", "z"])
    assert r.meta["history"][-1] == {"op": "remove", "labels": ["y"]}
    with pytest.raises(UserError, match="not in the token set: 'q'"):
        remove(s, ["y", "q"])
    with pytest.raises(UserError, match="empty token set"):
        remove(s, ["x", "y", "z"])


def test_rename_moves_vectors_and_arrays_with_their_label():
    s = stored(["x", "y", "z"])
    r = rename(s, {"x": "y", "y": "x"})  # a swap is no collision
    assert r.labels == ["y", "x", "z"]
    assert torch.equal(r.vectors["y"], s.vectors["x"]) and torch.equal(r.arrays["x"]["shots"], s.arrays["y"]["shots"])  # fmt: skip
    assert r.meta["history"][-1] == {"op": "rename", "map": {"x": "y", "y": "x"}}
    with pytest.raises(UserError, match="not in the token set: 'q'"):
        rename(s, {"q": "r"})
    with pytest.raises(UserError, match="two classes the label.* 'z'"):
        rename(s, {"x": "z"})
    with pytest.raises(UserError, match="control character"):
        rename(s, {"x": "a\nb"})
    with pytest.raises(UserError, match="empty"):
        rename(s, {"x": ""})


def test_history_of_a_set_from_one_run_is_that_run():
    s = stored(["x"])
    assert history(s.meta, s.labels) == [
        {"op": "train", "labels": ["x"], "method": "mcti", "steps": 7, "settings": {"lr": 0.005},
         "data_root": "/data/0", "train_files": ["x/a.png"]}
    ]  # fmt: skip
