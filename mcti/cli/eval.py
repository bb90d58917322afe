"""`mcti eval`: accuracy of a token set on a labelled image folder; with --reject and
--unknown DIR, how well it says "none of these" (open set)."""

import json

from mcti.settings import EvalArgs

HIDDEN = ("files", "predictions", "rejection_scores")  # per-image lists: not printed


def run(a: EvalArgs) -> None:
    from mcti.data.coop import open_dataset
    from mcti.eval.evaluate import eval_indices, evaluate, load_classifier, plot_confusion

    data = open_dataset(a.data, "test", min_classes=1)
    loaded = load_classifier(a)
    idx = eval_indices(data, loaded.meta, a.include_train, a.limit)
    rejector = None
    if a.reject != "off" or a.unknown:
        from mcti.eval.openset import image_tree, make_rejector

        if a.unknown:
            image_tree(a.unknown)  # a wrong folder fails before any scoring
        rejector = make_rejector(
            loaded.bundle,
            loaded.labels,
            loaded.meta,
            a.tokens,
            "auto" if a.reject == "off" else a.reject,
            a.known_recall,
        )
    r = evaluate(loaded, data, idx, a.batch_images, quiet=a.json, rejector=rejector)
    if a.unknown:
        r.update(unknown_results(loaded, a, rejector, r))
    print_results(r, a.json)  # first: a failing plot must not lose them
    if a.plot:
        plot_confusion(r, a.plot)
        if not a.json:
            print(f"confusion matrix: {a.plot}")
        if a.unknown:
            import torch

            from mcti.eval.openset import histogram_path, plot_histogram

            hist = histogram_path(a.plot)
            plot_histogram(
                torch.tensor(r["rejection_scores"]),
                torch.tensor(r["unknown_rejection_scores"]),
                rejector.threshold,
                rejector.score,
                hist,
            )
            if not a.json:
                print(f"open-set score histogram: {hist}")


def unknown_results(loaded, a: EvalArgs, rejector, known: dict) -> dict:
    """Score the --unknown images: AUROC, FPR at 95% known recall, rejected fractions."""
    import torch

    from mcti.eval.evaluate import score_all
    from mcti.eval.openset import load_tree, open_set_metrics

    pixels, skipped = load_tree(a.unknown, loaded.bundle.resolution)
    s = score_all(loaded, pixels, a.batch_images, desc="unknown", quiet=a.json)
    unknown = rejector.scores(loaded.bundle, pixels, s)
    m = open_set_metrics(torch.tensor(known["rejection_scores"]), unknown, rejector.threshold)
    return {
        **m,
        "n_unknown": len(pixels),
        "n_unknown_skipped": skipped,
        "unknown_rejection_scores": unknown.tolist(),
    }


def print_results(r: dict, as_json: bool) -> None:
    if as_json:
        hidden = (*HIDDEN, "unknown_rejection_scores")
        print(json.dumps({k: v for k, v in r.items() if k not in hidden}))
        return
    print(f"\n{'label':<24} {'accuracy':>9} {'n':>5}")
    for label, acc in r["per_class"].items():
        print(f"{label:<24} {acc:>9.1%} {r['per_class_n'][label]:>5}")
    line = f"\naccuracy {r['accuracy']:.1%} on {r['n_images']} images ({r['scorer']} scorer)"
    if "top5" in r:
        line += f", top-5 {r['top5']:.1%}"
    if "ece" in r:
        line += f", ECE {r['ece']:.3f} (15 bins)"
    print(
        line + f"; {r['images_per_s']:.2f} images/s, {r['unet_rows_per_image']:.0f} UNet rows/image"
    )
    if r["n_skipped"]:
        print(f"skipped {r['n_skipped']} unreadable file(s)")
    if "reject" in r:
        rj = r["reject"]
        print(
            f"open set ({rj['score']} score, threshold {rj['threshold']:.4g}, {rj['mode']}): "
            f"{r['rejected_fraction']:.1%} of known images rejected; accuracy with rejection "
            f"{r['accuracy_with_reject']:.1%}"
        )
    if "auroc" in r:
        print(
            f"unknown images ({r['n_unknown']}): AUROC {r['auroc']:.3f}, FPR at 95% known "
            f"recall {r['fpr_at_95']:.1%}, {r['unknown_rejected']:.1%} rejected"
        )
