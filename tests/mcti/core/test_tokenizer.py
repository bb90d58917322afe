"""The byte-level BPE tokenizer builder that pretraining and tiny-random share."""

from mcti.core.tokenizer import BASE_WORDS, build_clip_tokenizer, bytes_to_unicode


def test_every_byte_has_its_own_printable_character():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a"


def test_listed_words_are_whole_tokens_and_any_text_round_trips():
    tok = build_clip_tokenizer(["sneaker", "ankle", "boot"])
    for word in ("sneaker", "ankle", "boot"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1
    unknown = tok("zebra", add_special_tokens=False).input_ids
    assert len(unknown) == 5  # one token per byte
    text = "a zebra ankle é"  # (decode spaces out punctuation, as CLIP's does)
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_the_default_vocabulary_knows_the_prompt_words_of_tiny_random():
    tok = build_clip_tokenizer()
    assert {"photo", "object", "cat", "dog"} <= set(BASE_WORDS)
    assert len(tok("a photo of a cat", add_special_tokens=False).input_ids) == 5
