"""Class tokens spliced into the text encoder vs an independent reference: a copy of the text
encoder whose vocabulary table is resized and written with the token vectors."""

import copy

import torch

from mcti.core.tokens import TokenSet, TokenTable


def reference_encode(bundle, tokens: TokenSet, table: TokenTable, prompts: list[str]):
    te = copy.deepcopy(bundle.text_encoder)
    te.resize_token_embeddings(len(tokens.tokenizer))
    ids = tokens.tokenizer.convert_tokens_to_ids(
        [w for k in range(tokens.num_classes) for w in tokens.prompt(k, "{}").split()]
    )
    with torch.no_grad():
        te.get_input_embeddings().weight[ids] = table.vectors.detach()
    input_ids = tokens.tokenize(prompts)
    out = te(input_ids=input_ids).last_hidden_state
    eos = [row.tolist().index(tokens.eos_id) for row in input_ids]
    return out, out[torch.arange(len(prompts)), eos]


def test_splice_matches_resized_vocabulary(tiny_bundle):
    tokens = TokenSet(tiny_bundle, num_classes=3, n_vectors=2)
    table = TokenTable(3, 2, tokens.init_vector("object"))
    with torch.no_grad():
        table.vectors.normal_(generator=torch.Generator().manual_seed(1))
    prompts = [
        tokens.prompt(k, t)
        for k, t in [(0, "a photo of a {}"), (2, "the {} in a dark photo"), (1, "{}")]
    ]
    hidden, pooled = tokens.encode(table, prompts)
    ref_hidden, ref_pooled = reference_encode(tiny_bundle, tokens, table, prompts)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)


def test_pooled_feature_is_at_eos_not_at_placeholder(tiny_bundle):
    tokens = TokenSet(tiny_bundle, num_classes=2)
    table = TokenTable(2, 1, tokens.init_vector("object"))
    ids = tokens.tokenize([tokens.prompt(1)])[0]
    eos = ids.tolist().index(tokens.eos_id)
    assert int(ids.argmax()) != eos  # the placeholder id is the largest: argmax would be wrong
    hidden, pooled = tokens.encode(table, [tokens.prompt(1)])
    torch.testing.assert_close(pooled[0], hidden[0, eos])


def test_only_token_vectors_get_gradients(tiny_bundle):
    tokens = TokenSet(tiny_bundle, num_classes=3)
    table = TokenTable(3, 1, tokens.init_vector("object"))
    hidden, _ = tokens.encode(table, [tokens.prompt(1)])
    hidden.square().sum().backward()
    grad = table.vectors.grad.abs().sum(1)
    assert grad[1] > 0 and grad[0] == 0 and grad[2] == 0
    assert all(p.grad is None for p in tiny_bundle.text_encoder.parameters())


def test_init_word_same_for_all_classes_and_base_encoder_untouched(tiny_bundle):
    before = tiny_bundle.text_encoder.get_input_embeddings()
    tokens = TokenSet(tiny_bundle, num_classes=4)
    table = TokenTable(4, 1, tokens.init_vector("object"))
    assert torch.equal(table.vectors[0], table.vectors[3])
    tokens.encode(table, [tokens.prompt(0)])
    assert tiny_bundle.text_encoder.get_input_embeddings() is before
    assert len(tiny_bundle.tokenizer) < len(tokens.tokenizer)
