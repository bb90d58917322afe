"""`mcti train --extend OLD`: new labels learned next to OLD's frozen tokens, one merged set."""

import json
import shutil
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file

from mcti.cli import main
from mcti.core.model import load_model
from mcti.core.store import load_tokens
from mcti.settings import TrainArgs
from mcti.train.loop import prepare, run_fingerprint
from tests.conftest import make_image_folder
from tests.mcti.train.conftest import SMALL
from tests.mcti.train.test_resume_interop import ARGS, train_argv
from tests.mcti.train.test_train_cli import one_error_line


def embeds(tok) -> dict[str, torch.Tensor]:
    """label -> (n, d) vectors of a token directory."""
    classes = json.loads((tok / "classes.json").read_text())["classes"]
    sd = load_file(str(tok / "learned_embeds.safetensors"))
    return {label: sd[t] for label, t in classes.items()}


@pytest.mark.parametrize("reg", ["denoise", "clip"])
def test_extend_learns_new_labels_and_keeps_old_tokens_bit_identical(old_set, tmp_path, reg):
    old_data, new_data, old_tok = old_set
    out = tmp_path / "ext"
    assert main(train_argv(new_data, out, *SMALL, "--reg", reg, "--extend", str(old_tok))) == 0
    before, after = embeds(old_tok), embeds(out)
    assert list(after) == ["sku-0000", "sku-0001", "sku-0002", "sku-0003", "sku-0004"]
    for label, v in before.items():
        assert torch.equal(after[label], v), label  # frozen: not one bit changed
    init = after["sku-0003"]
    assert not torch.equal(after["sku-0003"], after["sku-0004"])  # both trained, apart
    assert not torch.equal(init, before["sku-0000"])
    meta = json.loads((out / "classes.json").read_text())
    assert [h["op"] for h in meta["history"]] == ["train", "extend"]
    ext = meta["history"][1]
    assert ext["labels"] == ["sku-0003", "sku-0004"] and ext["replaced"] == []
    assert ext["reg"] == reg and ext["from"] == str(old_tok)
    assert len(ext["train_files"]) == 4 and ext["data_root"] == str(new_data.resolve())
    assert meta["method"] == "mcti" and meta["steps"] == 3  # the first run's, as before
    assert meta["data_root"] == str(old_data.resolve()) and len(meta["train_files"]) == 6
    # mcti eval leaves out the extension's shots too (they are in the history)
    from mcti.data.folders import scan_folder
    from mcti.eval.evaluate import eval_indices

    data = scan_folder(new_data)
    kept = {data.paths[i] for i in eval_indices(data, meta, False, 0)}
    assert len(kept) == 2 and not kept & set(ext["train_files"])
    # it loads and classifies like any set
    bundle = load_model("tiny-random", device="cpu")
    tokens, table, labels, _ = load_tokens(out, bundle)
    assert tokens.num_classes == 5 and labels[3:] == ["sku-0003", "sku-0004"]


def test_old_classes_are_candidates_and_get_no_gradient(old_set, tmp_path):
    """The discriminative term sees all K classes; the optimizer sees only the new ones."""
    from mcti.train.loop import batch_loss, batch_of_shots, full_table

    _, new_data, old_tok = old_set
    cfg = TrainArgs(
        model="tiny-random", data=str(new_data), out=str(tmp_path / "o"), extend=str(old_tok),
        negatives=4, draws=1, batch_size=4, device="cpu",
    )  # fmt: skip
    p = prepare(cfg, quiet=True)
    assert p.table.num_classes == 2 and p.tokens.num_classes == 5
    n_new = len(p.shot_paths)
    assert sorted(set(p.labels[:n_new].tolist())) == [3, 4]  # shots of --data, merged indices
    assert sorted(set(p.labels[n_new:].tolist())) == [0, 1, 2]  # then OLD's shots
    idx = torch.tensor([0, 1, n_new, n_new + 1])  # two new-class items, two old-class items
    batch = batch_of_shots(p, idx, torch.Generator().manual_seed(0))
    assert batch["negatives"].shape == (4, 4)  # negatives drawn among all 5 classes
    assert (batch["negatives"] < 3).any()  # ... old ones included
    loss, _ = batch_loss(p, batch)
    loss.backward()
    assert p.table.vectors.grad is not None and p.table.vectors.grad.abs().sum() > 0
    assert not p.extension.frozen.requires_grad  # the old rows are no parameter
    assert full_table(p).vectors.shape == (5, 32)
    with torch.no_grad():  # the old tokens are candidates: moving them moves the loss
        p.extension.frozen[:3] += 1.0
        assert batch_loss(p, batch)[0] != loss


def test_replace_retrains_only_that_class(old_set, tmp_path, capsys):
    old_data, _, old_tok = old_set
    one = tmp_path / "one"
    shutil.copytree(old_data / "sku-0001", one / "sku-0001")
    out = tmp_path / "rep"
    assert main(train_argv(one, out, *SMALL, "--extend", str(old_tok))) == 2
    line = one_error_line(capsys, "train")
    assert "already in" in line and "'sku-0001'" in line and "--replace" in line
    assert main(train_argv(one, out, *SMALL, "--extend", str(old_tok), "--replace")) == 0
    before, after = embeds(old_tok), embeds(out)
    assert list(after) == list(before)  # same classes, same order
    assert not torch.equal(after["sku-0001"], before["sku-0001"])
    for label in ("sku-0000", "sku-0002"):
        assert torch.equal(after[label], before[label])
    ext = json.loads((out / "classes.json").read_text())["history"][-1]
    assert ext["labels"] == [] and ext["replaced"] == ["sku-0001"]


def test_extend_refusals_are_one_line(old_set, tmp_path, capsys):
    _, new_data, old_tok = old_set
    out = tmp_path / "x"
    # another base model (its fingerprint differs): named
    assert main(train_argv(new_data, out, *SMALL, "--extend", str(old_tok), model="embedded")) == 2
    line = one_error_line(capsys, "train")
    assert "another base model (tiny-random)" in line and "'embedded'" in line
    assert (
        main(train_argv(new_data, out, *SMALL, "--extend", str(old_tok), "--n-vectors", "2")) == 2
    )
    assert "has 1 vector(s) per class but --n-vectors is 2" in one_error_line(capsys, "train")
    bare = shutil.copytree(old_tok, tmp_path / "bare", ignore=shutil.ignore_patterns("check*"))
    assert main(train_argv(new_data, bare, *SMALL, "--extend", str(bare))) == 2
    assert "--out is the --extend directory" in one_error_line(capsys, "train")
    assert main(train_argv(new_data, out, *SMALL, "--extend", str(tmp_path / "nope"))) == 2
    assert "is not a token directory" in one_error_line(capsys, "train")
    assert not out.exists()


def test_extend_with_reg_clip_needs_the_old_images(old_set, tmp_path, capsys):
    old_data, new_data, old_tok = old_set
    moved = tmp_path / "old-tok"
    shutil.copytree(old_tok, moved)
    meta = json.loads((moved / "classes.json").read_text())
    meta["data_root"] = str(tmp_path / "gone")  # the old shots' folder moved away
    (moved / "classes.json").write_text(json.dumps(meta))
    out = tmp_path / "x"
    assert main(train_argv(new_data, out, *SMALL, "--reg", "clip", "--extend", str(moved))) == 2
    line = one_error_line(capsys, "train")
    assert "cannot be read" in line and "--reg denoise" in line
    assert main(train_argv(new_data, out, *SMALL, "--extend", str(moved))) == 0  # denoise: fine


def test_fingerprint_of_a_run_without_extend_is_that_of_older_versions(tmp_path):
    """Old checkpoints resume: with --extend off, the run fingerprint's config holds exactly the
    keys it held before `extend`, `replace` and `hard_negatives` joined TrainArgs."""
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=2)
    cfg = TrainArgs(model="tiny-random", data=str(data), out=str(tmp_path / "o"), device="cpu")
    fp = run_fingerprint(cfg, prepare(cfg, quiet=True))
    older = {f.name for f in fields(TrainArgs)} - {"extend", "replace", "hard_negatives"}
    older -= {"fit_folds", "fused_m", "fused_timesteps"}  # fused fit (issue 12): never in it
    older -= {"steps", "save_every", "resume", "quiet", "out", "device"}
    assert set(json.loads(fp["config"])) == older
    assert set(fp) == {"config", "base_model", "shots"}


def test_a_resumed_extension_must_extend_the_same_set(old_set, tmp_path, capsys):
    _, new_data, old_tok = old_set
    old = shutil.copytree(old_tok, tmp_path / "old")
    out = tmp_path / "ext"
    assert main(train_argv(new_data, out, "--steps", "2", *ARGS[2:], "--extend", str(old))) == 0
    sd = load_file(str(old / "learned_embeds.safetensors"))
    sd["<mcti-0>"] += 1  # someone retrained the old set in place
    from safetensors.torch import save_file

    save_file(sd, str(old / "learned_embeds.safetensors"))
    argv = train_argv(new_data, out, "--steps", "4", *ARGS[2:], "--extend", str(old), "--resume")
    assert main(argv) == 2
    assert "differs in: extended_set" in one_error_line(capsys, "train")
