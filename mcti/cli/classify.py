"""`mcti classify`: the best labels of image files."""

import json

from mcti.errors import UserError
from mcti.settings import ClassifyArgs


def run(a: ClassifyArgs) -> None:
    import torch

    from mcti.data.images import load_image
    from mcti.eval.evaluate import load_classifier, score_all

    loaded = load_classifier(a)
    pixels = []
    for path in a.images:
        try:
            pixels.append(load_image(path, loaded.bundle.resolution))
        except FileNotFoundError as e:
            raise UserError(f"no such image file: {path}") from e
        except Exception as e:
            raise UserError(f"cannot read image '{path}': {e}") from e
    rejector = None
    if a.reject != "off":
        from mcti.eval.openset import make_rejector

        rejector = make_rejector(
            loaded.bundle, loaded.labels, loaded.meta, a.tokens, a.reject, a.known_recall
        )
    x = torch.stack(pixels)  # (N, 3, H, W)
    s = score_all(loaded, x, a.batch_images, desc="classify", quiet=True)
    idx, scores = s.topk(a.top_k)
    results = [
        {
            "image": path,
            "labels": [loaded.labels[j] for j in idx[i].tolist()],
            "scores": [round(float(x), 6) for x in scores[i]],
            # calibrated probabilities of the same labels (scorers that have them: fused)
            **(
                {"probs": [round(float(s.probs[i, j]), 6) for j in idx[i]]}
                if s.probs is not None
                else {}
            ),
        }
        for i, path in enumerate(a.images)
    ]
    if rejector is not None:
        # "label": the best known label, or "unknown"; the known labels stay listed
        rej = rejector.scores(loaded.bundle, x, s)
        for r, v in zip(results, rej.tolist(), strict=True):
            r["label"] = r["labels"][0] if v >= rejector.threshold else "unknown"
            r["rejection_score"] = round(v, 6)
    if a.json:
        print(json.dumps(results))
        return
    for r in results:
        best = ", ".join(
            f"{lab} ({sc:.4g})" for lab, sc in zip(r["labels"], r["scores"], strict=True)
        )
        if r.get("label") == "unknown":
            best = f"unknown (rejection score {r['rejection_score']:.4g}; best known: {best})"
        print(f"{r['image']}: {best}")
