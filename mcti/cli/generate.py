"""`mcti generate`: a PNG grid of images of one class, drawn with its learned token."""

from mcti.settings import GenerateArgs


def run(a: GenerateArgs) -> None:
    from tqdm import tqdm

    from mcti.atomic import atomic_write
    from mcti.core.generate import generate, to_grid
    from mcti.core.model import load_model
    from mcti.core.store import label_index, load_tokens, read_meta

    spec = a.model or read_meta(a.tokens)["base_model"]["spec"]
    bundle = load_model(spec, a.device, a.precision, a.attention, a.clip)
    tokens, table, labels, _ = load_tokens(a.tokens, bundle)
    k = label_index(labels, a.label)
    images = generate(
        bundle,
        tokens,
        table,
        k,
        a.n,
        a.prompt,
        a.steps,
        a.guidance,
        a.seed,
        progress=lambda it: tqdm(it, desc="sample", unit="step"),
    )
    grid = to_grid(images, upscale_to=128)
    atomic_write(a.out, lambda tmp: grid.save(tmp, format="PNG"))
    print(f"wrote {a.n} images of '{a.label}' to {a.out}")
