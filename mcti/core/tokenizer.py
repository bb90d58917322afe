"""A small byte-level BPE CLIP tokenizer built from a word list (no vocabulary download).

Every byte is a token, so any text tokenizes; each listed word gets the merges that make it one
token, in list order (BPE applies earlier merges first, so a word whose letters an earlier
word's merge joins differently, e.g. "clean" after "an", stays two tokens). `mcti pretrain` builds the embedded model's tokenizer here from its
caption words, and `tiny-random` builds its own from `BASE_WORDS`.
"""

# Generic caption words every built tokenizer knows as single tokens (others split into bytes).
BASE_WORDS = (
    "a an the of in on with and photo picture image rendering cropped close-up bright dark "
    "clean small large good one object thing cat dog car shirt shoe bag"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_clip_tokenizer(words: list[str] | tuple[str, ...] = BASE_WORDS):
    """A byte-level BPE CLIP tokenizer whose vocabulary is the 256 bytes plus `words`."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>", *chars, *[c + "</w>" for c in chars]]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        units = list(word)
        units[-1] += "</w>"
        left = units[0]
        for right in units[1:]:
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((left, right))
            left = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
