"""`mcti eval`: accuracy of a token set on a labelled image folder."""

import json

from mcti.settings import EvalArgs


def run(a: EvalArgs) -> None:
    from mcti.data.coop import open_dataset
    from mcti.eval.evaluate import eval_indices, evaluate, load_classifier, plot_confusion

    data = open_dataset(a.data, "test", min_classes=1)
    loaded = load_classifier(a)
    idx = eval_indices(data, loaded.meta, a.include_train, a.limit)
    r = evaluate(loaded, data, idx, a.batch_images, quiet=a.json)
    print_results(r, a.json)  # first: a failing plot must not lose them
    if a.plot:
        plot_confusion(r, a.plot)
        if not a.json:
            print(f"confusion matrix: {a.plot}")


def print_results(r: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({k: v for k, v in r.items() if k not in ("files", "predictions")}))
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
