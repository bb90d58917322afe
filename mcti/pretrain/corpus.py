"""The pretraining corpus: images of every seen class of the offline datasets, their concept
ids, the captions that name them, the tokenizer's words, and balanced batches."""

import re
from dataclasses import dataclass, field

import torch

from mcti.core.tokenizer import BASE_WORDS
from mcti.core.tokens import TEMPLATES
from mcti.data.offline import FLIP_OK, Split, load_split
from mcti.errors import UserError
from mcti.eval.baselines import split_pixels
from mcti.settings import PretrainArgs

# Caption templates: the prompt templates tokens are learned with (mcti.core.tokens.TEMPLATES),
# plus a few drawing-style ones; the concept's name goes into {}.
EXTRA_TEMPLATES = (
    "a drawing of a {}",
    "a silhouette of a {}",
    "a picture of a {}",
    "an image of the {}",
    "a {}",
)
GENERIC_WORD = "object"  # mcti's default --init-word: captions sometimes use it instead of a name


def captions_for(name: str) -> list[str]:
    return [t.format(name) for t in (*TEMPLATES, *EXTRA_TEMPLATES)]


def build_vocab(concept_names: list[str]) -> list[str]:
    """Whole words of the tokenizer: template words, concept names, generic words."""
    text = " ".join([*TEMPLATES, *EXTRA_TEMPLATES, *concept_names, GENERIC_WORD, *BASE_WORDS])
    words = re.findall(r"[a-z]+", text.lower().replace("{}", " "))
    return sorted(set(words))


@dataclass
class Corpus:
    pixels: torch.Tensor  # (N, 1, H, W) float16 in [-1, 1] (grey; expanded to RGB on use)
    concept: torch.Tensor  # (N,) long: global concept id
    flip_ok: torch.Tensor  # (N,) bool
    names: list[str]  # concept names, by global id
    source: list[str]  # dataset of each concept
    # image indices grouped by concept: (order (N,), counts (K,), starts (K,)), for sampling
    by_concept: tuple[torch.Tensor, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        counts = torch.bincount(self.concept, minlength=len(self.names))
        self.by_concept = (self.concept.argsort(stable=True), counts, counts.cumsum(0) - counts)


def build_corpus(a: PretrainArgs, limit_per_class: int = 0) -> tuple[Corpus, dict[str, Split]]:
    """Pretraining images of every seen class of the chosen datasets, with concept ids."""
    px, cid, flip, names, source, splits = [], [], [], [], [], {}
    for ds in [d.strip() for d in a.datasets.split(",") if d.strip()]:
        s = load_split(ds)
        splits[ds] = s
        for k in s.seen:
            idx = s.pretrain[s.labels[s.pretrain] == k]
            if limit_per_class:
                idx = idx[:limit_per_class]
            px.append(split_pixels(s, idx, a.resolution).half())
            cid.append(torch.full((len(idx),), len(names), dtype=torch.long))
            flip.append(torch.full((len(idx),), FLIP_OK[ds], dtype=torch.bool))
            names.append(s.names[k])
            source.append(ds)
    if not names:
        raise UserError("--datasets selected no seen classes")
    return Corpus(torch.cat(px), torch.cat(cid), torch.cat(flip), names, source), splits


def sample_balanced(corpus: Corpus, n: int, gen: torch.Generator) -> torch.Tensor:
    """n image indices: concept uniform, then an image of it (datasets differ 100x in size)."""
    order, counts, starts = corpus.by_concept
    c = torch.randint(len(corpus.names), (n,), generator=gen)
    off = (torch.rand(n, generator=gen) * counts[c]).long()
    return order[starts[c] + off]


def batch_pixels(corpus: Corpus, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B,) indices -> (B, 3, H, W) float, with random flips where the class allows them."""
    x = corpus.pixels[idx].float()
    f = (torch.rand(len(idx), generator=gen) < 0.5) & corpus.flip_ok[idx]
    x = torch.where(f.view(-1, 1, 1, 1), x.flip(-1), x)
    return x.expand(-1, 3, -1, -1)
