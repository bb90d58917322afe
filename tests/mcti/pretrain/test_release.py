"""`python -m mcti.pretrain.release`: a shipped model carries its measurements, a card and
checksums that verify."""

import hashlib
import json

from mcti.cli import main as mcti_main
from mcti.core.model import load_model
from mcti.pretrain.release import main


def test_ship_writes_measurements_card_and_valid_checksums(tmp_path):
    src, dst = tmp_path / "m", tmp_path / "shipped"
    argv = ["pretrain", "--out", str(src), "--datasets", "digits", "--channels", "16,32"]
    argv += ["--eval-every", "0", "--quiet", "--clip-steps", "2", "--steps", "2"]
    assert mcti_main(argv + ["--batch-size", "2", "--clip-batch-size", "4"]) == 0
    main([str(src), str(dst), "--per-class", "1", "--n-samples", "2", "--to-keep", "1"])

    listed = dict(
        reversed(line.split("  ", 1)) for line in (dst / "SHA256SUMS").read_text().splitlines()
    )
    files = {str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(listed) == files and "MODEL_CARD.md" in files
    for name, digest in listed.items():
        assert hashlib.sha256((dst / name).read_bytes()).hexdigest() == digest, name
    assert not (dst / "checkpoint").exists() and not (dst / "pretrain_log.jsonl").exists()

    info = json.loads((dst / "pretrain.json").read_text())
    seen = info["measured"]["seen"]
    assert info["measured"]["per_class"] == 1 and set(seen) == {"diffusion", "clip"}
    card = (dst / "MODEL_CARD.md").read_text()
    d = seen["diffusion"]
    row = f"| seen | diffusion | {d['digits']:.1%} | {d['mean']:.1%} | {d['pooled']:.1%} |"
    assert row in card and "--steps 2 --seed 0" in card
    assert load_model(str(dst), device="cpu").clip is not None
