"""`mcti tokens info|list|merge|remove|rename` as a user meets them."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mcti.cli import main
from mcti.core.model import load_model, save_model
from mcti.core.store import load_tokens
from mcti.core.tiny import build_tiny_random
from tests.conftest import make_image_folder
from tests.mcti.train.test_resume_interop import ARGS, train_argv
from tests.mcti.train.test_train_cli import one_error_line

SMALL = ["--steps", "2", *ARGS[2:]]


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """A tiny model saved in diffusers format, and two 2-class sets trained on it with
    disjoint labels (sku-*, part-*)."""
    root = tmp_path_factory.mktemp("tokens")
    model = root / "model"
    save_model(build_tiny_random(), model)
    a = make_image_folder(root / "a", n_classes=2, per_class=2)
    b = make_image_folder(root / "b", n_classes=2, per_class=2, seed=1)
    for d in sorted(b.iterdir()):
        d.rename(b / d.name.replace("sku", "part"))
    assert main(train_argv(a, root / "A", *SMALL, model=str(model))) == 0
    assert main(train_argv(b, root / "B", *SMALL, model=str(model))) == 0
    return model, root / "A", root / "B"


def vectors(tok) -> dict[str, torch.Tensor]:
    classes = json.loads((tok / "classes.json").read_text())["classes"]
    sd = load_file(str(tok / "learned_embeds.safetensors"))
    return {label: sd[t] for label, t in classes.items()}


def test_info_and_list(two_sets, capsys):
    _, A, _ = two_sets
    assert main(["tokens", "list", str(A)]) == 0
    assert capsys.readouterr().out == "sku-0000\nsku-0001\n"
    assert main(["tokens", "list", str(A), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ["sku-0000", "sku-0001"]
    assert main(["tokens", "info", str(A)]) == 0
    out = capsys.readouterr().out
    assert "classes     2 (1 vector(s) per class)" in out and "method      mcti, reg denoise" in out
    assert "shots=2" in out and "history 1   trained sku-0000, sku-0001" in out
    assert main(["tokens", "info", str(A), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"] == 2 and info["n_vectors"] == 1 and info["steps"] == 2
    assert info["base_model"]["spec"].endswith("model") and info["train_files"] == 4


def test_merged_set_loads_in_diffusers_and_keeps_every_vector(two_sets, tmp_path, capsys):
    """The merged file still loads through load_textual_inversion's list form (README
    "Formats") and gives our conditioning for a class that came from the second set."""
    from diffusers import StableDiffusionPipeline

    model, A, B = two_sets
    C = tmp_path / "C"
    assert main(["tokens", "merge", str(A), str(B), "--out", str(C)]) == 0
    assert "wrote 4 class tokens" in capsys.readouterr().out
    merged = vectors(C)
    assert list(merged) == ["sku-0000", "sku-0001", "part-0000", "part-0001"]
    for label, v in {**vectors(A), **vectors(B)}.items():
        assert torch.equal(merged[label], v)
    meta = json.loads((C / "classes.json").read_text())
    assert [h["op"] for h in meta["history"]] == ["train", "train", "merge"]

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    sd = load_file(str(C / "learned_embeds.safetensors"))
    pipe.load_textual_inversion(list(sd.values()), token=list(sd.keys()))
    tokens, table, labels, meta = load_tokens(C, load_model(str(model), device="cpu"))
    prompt = "a photo of a " + meta["classes"]["part-0001"]
    theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    ours, _ = tokens.encode(table, [tokens.prompt(labels.index("part-0001"))])
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_remove_and_rename(two_sets, tmp_path, capsys):
    _, A, _ = two_sets
    assert main(["tokens", "remove", str(A), "--labels", "sku-0000", "--out", str(tmp_path / "r")]) == 0  # fmt: skip
    assert list(vectors(tmp_path / "r")) == ["sku-0001"]
    assert torch.equal(vectors(tmp_path / "r")["sku-0001"], vectors(A)["sku-0001"])
    argv = ["tokens", "rename", str(A), "--map", "sku-0000=cat,sku-0001=dog", "--out"]
    assert main([*argv, str(tmp_path / "n")]) == 0
    renamed = vectors(tmp_path / "n")
    assert list(renamed) == ["cat", "dog"] and torch.equal(renamed["dog"], vectors(A)["sku-0001"])
    assert main(["tokens", "list", str(tmp_path / "n")]) == 0
    assert capsys.readouterr().out.endswith("cat\ndog\n")


def test_mistakes_are_one_line(two_sets, tmp_path, capsys):
    _, A, B = two_sets
    other = shutil.copytree(B, tmp_path / "other")
    meta = json.loads((other / "classes.json").read_text())
    meta["base_model"].update(spec="sd15", fingerprint="0123456789abcdef")
    (other / "classes.json").write_text(json.dumps(meta))
    out = str(tmp_path / "out")
    cases = [
        (["merge", str(A), str(other)], "merge", "different base model"),
        (["merge", str(A), str(A)], "merge", "more than one set: 'sku-0000', 'sku-0001'"),
        (["merge", str(A)], "merge", "at least two token directories"),
        (["remove", str(A), "--labels", "nope"], "remove", "not in the token set: 'nope'"),
        (["remove", str(A), "--labels", "sku-0000,sku-0001"], "remove", "empty token set"),
        (["rename", str(A), "--map", "sku-0000=sku-0001"], "rename", "two classes the label"),
        (["rename", str(A), "--map", "sku-0000"], "rename", "takes OLD=NEW"),
        (["rename", str(A), "--map", "x=y"], "rename", "not in the token set: 'x'"),
        (["list", str(tmp_path)], "list", "is not a token directory"),
    ]
    for args, cmd, words in cases:
        outs = ["--out", out] if cmd in ("merge", "remove", "rename") else []
        assert main(["tokens", *args, *outs]) == 2, args
        line = one_error_line(capsys, f"tokens {cmd}")
        assert words in line and "0123456789abcdef" in line if "base" in words else words in line, line  # fmt: skip
    assert not (tmp_path / "out").exists()  # nothing written by a refused edit
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["tokens", "remove", str(A), "--labels", "sku-0000", "--out", str(tmp_path / "full")]) == 2  # fmt: skip
    assert "is not empty" in one_error_line(capsys, "tokens remove")
    assert main(["tokens"]) == 2
    assert "required: SUBCOMMAND" in one_error_line(capsys, "tokens")


def test_help_comes_from_the_settings_docstrings(capsys):
    assert main(["tokens", "merge", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Two or more token directories" in out and "--out OUT" in out
    assert main(["tokens", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(s in out for s in ("info", "list", "merge", "remove", "rename"))
