"""`mcti pretrain` (quick setting), the offline data split and the shipped embedded model (the
true-name classifier's test is in tests/mcti/eval/test_baselines.py)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mcti.data import offline as realdata

HELD_OUT_NAMES = {"bird", "elephant", "zebra", "sandal", "bag"}


def _has_animal() -> bool:
    try:
        import animal_mnist  # noqa: F401

        return True
    except ImportError:
        return False


def _missing(name: str) -> str | None:
    """Why a dataset cannot be read here (None when it can)."""
    if name == "animal-mnist" and not _has_animal():
        return f"animal-mnist not installed ({realdata.INSTALL_HINT[name]})"
    if name == "fashion-mnist":
        if not (realdata.FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
            return f"fashion-mnist not in {realdata.FASHION_DIR} ({realdata.INSTALL_HINT[name]})"
    return None


def _available() -> list[str]:
    return [d for d in ("digits", "animal-mnist", "fashion-mnist") if _missing(d) is None]


@pytest.mark.parametrize("name", ["digits", "animal-mnist", "fashion-mnist"])
def test_split_is_disjoint_seeded_and_hides_novel_classes(name):
    if _missing(name):  # a skip that says why (and fails under CI=true: tests/conftest.py)
        pytest.skip(_missing(name))
    s = realdata.load_split(name)
    assert len(np.intersect1d(s.pretrain, s.held_out)) == 0
    assert len(s.pretrain) + len(s.held_out) <= len(s.labels)
    assert not set(s.labels[s.pretrain].tolist()) & set(s.novel)
    for k in s.novel:  # every image of a novel class is held out
        assert (s.labels[s.held_out] == k).sum() == (s.labels == k).sum()
    again = realdata.load_split(name)
    assert np.array_equal(again.pretrain, s.pretrain)
    assert np.array_equal(again.held_out, s.held_out)
    if name == "digits":
        assert all(
            (s.labels[s.held_out] == k).sum() == realdata.HELD_OUT["digits"] for k in range(10)
        )
    if name == "fashion-mnist":  # seen-class held-out images are exactly the official test split
        assert len(s.held_out) == 10_000 + 2 * 6_000


def test_write_folder_uses_opaque_keys(tmp_path):
    s = realdata.load_split("digits")
    idx = realdata.held_out_sample(s, [3, 7, 9], 4, seed=0)
    names = realdata.write_folder(s, idx, tmp_path / "data")
    assert names == {"c00": "three", "c01": "seven", "c02": "nine"}
    files = sorted(p.relative_to(tmp_path / "data") for p in (tmp_path / "data").rglob("*.png"))
    assert len(files) == 12
    assert {f.parts[0] for f in files} == {"c00", "c01", "c02"}
    assert not any(n in str(f) for f in files for n in names.values())
    meta = json.loads(realdata.names_file(tmp_path / "data").read_text())
    assert meta["names"] == names and meta["dataset"] == "digits"
    # the image written for held-out index i is that image (bicubic 8 -> 28 px)
    from PIL import Image

    i = int(idx[0])
    im = np.asarray(Image.open(tmp_path / "data" / "c00" / f"digits-{i:05d}.png").convert("L"))
    want = np.asarray(Image.fromarray(s.images[i]).resize((28, 28), Image.BICUBIC))
    assert np.array_equal(im, want)


def test_quick_pretrain_writes_a_loadable_model(tmp_path):
    from mcti.core.model import load_model
    from mcti.pretrain import PretrainArgs, run

    out = tmp_path / "m"
    run(PretrainArgs(out=str(out), quick=True, eval_every=0, datasets="digits", quiet=True))
    for part in ("model_index.json", "unet", "text_encoder", "tokenizer", "scheduler", "clip"):
        assert (out / part).exists(), part
    assert not (out / "vae").exists()
    b = load_model(str(out), device="cpu")
    assert b.vae is None and b.clip is not None
    assert b.unet.config.in_channels == 3 and b.resolution == 16
    # one text tower: text_encoder/ equals clip/'s text model
    ref = b.clip.text_model.state_dict()
    for k, v in b.text_encoder.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    info = json.loads((out / "pretrain.json").read_text())
    assert info["steps_done"] == 6
    assert info["concepts"] == realdata.NAMES["digits"]  # digits has no novel class
    # concept words are whole tokens
    assert len(b.tokenizer("seven", add_special_tokens=False).input_ids) == 1
    # a second run into the same folder needs --resume
    from mcti.errors import UserError

    with pytest.raises(UserError, match="--resume"):
        run(PretrainArgs(out=str(out), quick=True, eval_every=0, datasets="digits", quiet=True))


def test_pretraining_concepts_exclude_novel_classes():
    from mcti.pretrain.corpus import build_corpus
    from mcti.settings import PretrainArgs

    datasets = [d for d in _available() if d != "fashion-mnist"]  # fashion: 48k images, slow
    corpus, splits = build_corpus(PretrainArgs(out="x", datasets=",".join(datasets)), 2)
    novel = {s.names[k] for s in splits.values() for k in s.novel}
    seen = {s.names[k] for s in splits.values() for k in s.seen}
    assert set(corpus.names) == seen and not novel & set(corpus.names)
    assert len(set(corpus.concept.tolist())) == len(corpus.names)


EMBEDDED = Path(__file__).resolve().parents[3] / "mcti" / "assets" / "embedded-model"


def test_embedded_model_files_match_their_hashes_and_load():  # shipped in the repo: never skipped
    from mcti.core.model import load_model

    lines = (EMBEDDED / "SHA256SUMS").read_text().split("\n")
    listed = {}
    for line in filter(None, lines):
        digest, name = line.split(maxsplit=1)
        listed[name.lstrip("*")] = digest
    files = {
        str(p.relative_to(EMBEDDED))
        for p in EMBEDDED.rglob("*")
        if p.is_file() and p.name != "SHA256SUMS"
    }
    assert files == set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((EMBEDDED / name).read_bytes()).hexdigest() == digest, name
    assert sum((EMBEDDED / n).stat().st_size for n in listed) <= 25 * 2**20
    b = load_model("embedded", device="cpu")
    assert b.vae is None and b.clip is not None
    info = json.loads((EMBEDDED / "pretrain.json").read_text())
    assert not HELD_OUT_NAMES & set(info["concepts"])
