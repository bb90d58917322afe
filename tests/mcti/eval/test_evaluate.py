"""evaluate() on a small labelled folder: accuracy, per-class accuracy and the confusion matrix
against an independent count of one-image-at-a-time predictions."""

import json

import torch

from mcti.core.scoring import Classifier
from mcti.core.store import load_tokens, save_tokens
from mcti.core.tokens import TokenTable
from mcti.data.folders import load_image, scan_folder
from mcti.eval.evaluate import eval_indices, evaluate, load_classifier
from mcti.settings import EvalArgs


def _tokens(tiny_bundle, path, labels, seed=0):
    table = TokenTable(len(labels), 1, torch.zeros(tiny_bundle.hidden_size))
    with torch.no_grad():
        table.vectors.normal_(std=2.0, generator=torch.Generator().manual_seed(seed))
    save_tokens(path, table, labels, tiny_bundle, extra={"data_root": "", "train_files": []})


def test_accuracy_matches_an_independent_count(tiny_bundle, image_folder, tmp_path):
    data = scan_folder(image_folder)
    # tokens list the labels in another order than the folder's (sorted) classes
    labels = list(reversed(data.classes))
    _tokens(tiny_bundle, tmp_path / "tok", labels)
    args = EvalArgs(tokens=str(tmp_path / "tok"), scorer="clip", device="cpu")
    loaded = load_classifier(args, tiny_bundle)
    r = evaluate(loaded, data, list(range(len(data))), batch=4, quiet=True)

    # reference: each image alone through a Classifier built from the saved files
    tokens, table, ref_labels, _ = load_tokens(tmp_path / "tok", tiny_bundle)
    clf = Classifier(tiny_bundle, tokens, table, scorer="clip")
    truth, pred = [], []
    for path, y in zip(data.paths, data.labels, strict=True):
        x = load_image(data.root / path, tiny_bundle.resolution)[None]
        pred.append(ref_labels[int(clf.score(x).scores.argmax())])
        truth.append(data.classes[y])
    n = len(truth)
    correct = sum(p == t for p, t in zip(pred, truth, strict=True))
    assert r["n_images"] == n == 18 and r["accuracy"] == correct / n
    assert r["predictions"] == pred and r["files"] == data.paths and r["labels"] == labels
    for label in labels:
        idx = [i for i, t in enumerate(truth) if t == label]
        assert r["per_class"][label] == sum(pred[i] == label for i in idx) / len(idx)
        assert r["per_class_n"][label] == len(idx)
    confusion = torch.tensor(r["confusion"])
    assert confusion.sum() == n and confusion.trace() == correct
    for t, p in zip(truth, pred, strict=True):
        assert confusion[labels.index(t), labels.index(p)] > 0
    assert "top5" not in r  # only for more than 5 classes
    json.dumps(r)  # `mcti eval --json` prints it as is


def test_training_images_are_left_out_of_the_same_folder(image_folder):
    data = scan_folder(image_folder)
    meta = {"data_root": str(image_folder.resolve()), "train_files": data.paths[:4]}
    idx = eval_indices(data, meta, include_train=False, limit=0)
    assert [data.paths[i] for i in idx] == data.paths[4:]
    assert len(eval_indices(data, meta, include_train=True, limit=0)) == len(data)
    limited = eval_indices(data, meta, include_train=True, limit=2)
    assert [data.labels[i] for i in limited] == [0, 0, 1, 1, 2, 2]
