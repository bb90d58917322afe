"""Class tokens: K x n_vectors new embeddings spliced into a frozen CLIP text encoder.

The vectors live in one small `nn.Parameter` (K * n_vectors, d) owned by `TokenTable`; the
49k-row vocabulary table is never trained or resized. Token strings follow diffusers'
textual-inversion convention: class k is `<mcti-k>`, its extra vectors `<mcti-k>_1`, ...
"""

import copy

import torch
from torch import nn

from mcti.core.model import ModelBundle
from mcti.errors import UserError

TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a good photo of a {}",
    "a photo of one {}",
    "a photo of the small {}",
    "a photo of the large {}",
)


def token_string(k: int) -> str:
    return f"<mcti-{k}>"


def token_words(k: int, n_vectors: int) -> list[str]:
    """The tokenizer words for class k: `<mcti-k> <mcti-k>_1 ...` (diffusers' convention)."""
    base = token_string(k)
    return [base] + [f"{base}_{i}" for i in range(1, n_vectors)]


def tokenize(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    """prompts -> (P, max_length) ids, padded and truncated to one length."""
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


def pool_at_eos(hidden: torch.Tensor, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(P, L, d) hidden states, (P, L) ids -> (P, d) the state at each prompt's first EOS.

    transformers pools at `argmax(ids)` for legacy configs (`eos_token_id == 2`, SD 1.x among
    them), which lands on an added placeholder id: pool at the EOS ourselves.
    """
    eos = (ids == eos_id).int().argmax(dim=1)  # (P,)
    return hidden[torch.arange(len(ids), device=ids.device), eos]


def project_text(clip: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """(P, d) pooled text states -> (P, P_dim) L2-normalised CLIP text embeddings."""
    return nn.functional.normalize(clip.text_projection(pooled), dim=-1)


class TokenTable(nn.Module):
    """The only trainable state: (K * n_vectors, d) class token vectors."""

    def __init__(self, num_classes: int, n_vectors: int, init: torch.Tensor):
        super().__init__()
        self.num_classes, self.n_vectors = num_classes, n_vectors
        vectors = init.detach().float().reshape(1, -1).repeat(num_classes * n_vectors, 1)
        self.vectors = nn.Parameter(vectors)  # (K * n, d)

    def per_class(self) -> torch.Tensor:
        return self.vectors.view(self.num_classes, self.n_vectors, -1)  # (K, n, d)


class SplicedEmbedding(nn.Module):
    """The text encoder's token embedding, with placeholder ids read from a TokenTable."""

    def __init__(self, base: nn.Embedding, lookup: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("lookup", lookup, persistent=False)  # token id -> table row or -1
        self.table: TokenTable | None = None  # set per call; not a registered submodule

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        row = self.lookup[ids.clamp(max=len(self.lookup) - 1)]  # (B, L)
        row = torch.where(ids < len(self.lookup), row, torch.full_like(row, -1))
        is_token = row >= 0
        out = self.base(torch.where(is_token, torch.zeros_like(ids), ids))  # (B, L, d)
        if self.table is None or not bool(is_token.any()):
            return out
        vectors = self.table.vectors.to(out.dtype)[row.clamp(min=0)]  # (B, L, d)
        return torch.where(is_token.unsqueeze(-1), vectors, out)


class TokenSet:
    """Class tokens for one base model: tokenizer with placeholders + prompt encoding."""

    def __init__(self, bundle: ModelBundle, num_classes: int, n_vectors: int = 1):
        if num_classes < 1 or n_vectors < 1:
            raise UserError("need at least one class and one vector per class")
        self.bundle, self.num_classes, self.n_vectors = bundle, num_classes, n_vectors
        self.tokenizer = copy.deepcopy(bundle.tokenizer)
        words = [w for k in range(num_classes) for w in token_words(k, n_vectors)]
        self.tokenizer.add_tokens(words)
        ids = self.tokenizer.convert_tokens_to_ids(words)
        lookup = torch.full((max(ids) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(ids)] = torch.arange(len(ids))
        self.embedding = SplicedEmbedding(self._base_embedding(), lookup.to(bundle.device))
        self.eos_id = self.tokenizer.eos_token_id

    def _base_embedding(self) -> nn.Embedding:
        emb = self.bundle.text_encoder.get_input_embeddings()
        return emb.base if isinstance(emb, SplicedEmbedding) else emb

    def init_vector(self, word: str) -> torch.Tensor:
        """The embedding of a generic initializer word (same for every class)."""
        ids = self.bundle.tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise UserError(f"--init-word '{word}' tokenizes to nothing")
        with torch.no_grad():
            return self._base_embedding().weight[ids].float().mean(0)  # (d,)

    def prompt(self, k: int, template: str = TEMPLATES[0]) -> str:
        return template.format(" ".join(token_words(k, self.n_vectors)))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ml = self.tokenizer.model_max_length
        max_len = min(
            ml if ml < 10_000 else 77, self.bundle.text_encoder.config.max_position_embeddings
        )
        return tokenize(self.tokenizer, prompts, max_len).to(self.bundle.device)

    def encode(
        self, table: TokenTable | None, prompts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (P, L, d) last hidden states (UNet conditioning), (P, d) pooled at the
        first EOS (`pool_at_eos`)."""
        ids = self.tokenize(prompts)  # (P, L)
        te = self.bundle.text_encoder
        original = te.get_input_embeddings()
        self.embedding.table = table
        te.set_input_embeddings(self.embedding)
        try:
            hidden = te(input_ids=ids).last_hidden_state  # (P, L, d)
        finally:
            te.set_input_embeddings(original)
            self.embedding.table = None
        return hidden, pool_at_eos(hidden, ids, self.eos_id)

    def class_conditioning(self, table: TokenTable, template: str = TEMPLATES[0]) -> torch.Tensor:
        """(K, L, d) conditioning for every class with one template; computed once per set."""
        with torch.no_grad():
            hidden, _ = self.encode(
                table, [self.prompt(k, template) for k in range(self.num_classes)]
            )
        return hidden

    def clip_text_features(self, table: TokenTable, prompts: list[str]) -> torch.Tensor:
        """(P, P_dim) L2-normalised CLIP text embeddings of prompts with class tokens."""
        clip = self.bundle.require_clip()
        _, pooled = self.encode(table, prompts)
        return project_text(clip, pooled)
