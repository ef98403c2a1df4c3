"""The parts every reranker shares: feature embeddings and an MLP block.

Everything else a model needs (attention layers, heads) lives in that model's own file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nar4rec.data.batch import PAD, RequestBatch
from nar4rec.data.features import FeatureSpace

UPSTREAM_NORMS = ("request", "none")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class MLP(nn.Module):
    """Linear -> activation -> dropout for each hidden size, then a linear output layer.

    Args:
        in_dim: input width.
        hidden: widths of the hidden layers (may be empty: then a single linear layer).
        out_dim: output width.
        dropout: dropout after every hidden activation.
        activation: "gelu", "relu" or "silu".
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, *,
                 dropout: float = 0.0, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, not "
                             f"{activation!r}")
        blocks: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            blocks += [nn.Linear(width, size), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = size
        blocks.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        return self.net(x)


class FeatureEmbedding(nn.Module):
    """Categorical and numeric features of a user or of candidates -> one d-vector each.

    Every categorical feature has its own table (rows from the FeatureSpace vocabulary, row 0
    = padding, kept at zero); the numeric features are projected by one linear layer; the
    pieces are concatenated and projected to `d_model`. Build it with `for_users` or
    `for_candidates`; `forward(batch)` then returns (B, d) or (B, N, d).

    Args:
        side: "user" or "candidate" (which fields of a RequestBatch `forward` reads).
        vocab_sizes: embedding rows of each categorical feature, in batch column order.
        numeric: number of numeric inputs, the upstream score included when used.
        d_model: output width d.
        embedding_dim: width of every categorical table and of the numeric projection.
        upstream_score: candidates only: append the ranking stage's score as a numeric input.
        upstream_norm: "request" standardises the upstream score over each request's real
            candidates (the score's scale differs between data sets and only its order
            within a request is comparable); "none" feeds it raw.
        dropout: dropout on the output.
    """

    def __init__(self, side: str, vocab_sizes: Sequence[int], numeric: int, d_model: int, *,
                 embedding_dim: int = 16, upstream_score: bool = False,
                 upstream_norm: str = "request", dropout: float = 0.0):
        super().__init__()
        if side not in ("user", "candidate"):
            raise ValueError(f"side must be 'user' or 'candidate', not {side!r}")
        if upstream_score and side != "candidate":
            raise ValueError("only candidates have an upstream score")
        if upstream_norm not in UPSTREAM_NORMS:
            raise ValueError(f"upstream_norm must be one of {UPSTREAM_NORMS}, not "
                             f"{upstream_norm!r}")
        self.side = side
        self.upstream_score = upstream_score
        self.upstream_norm = upstream_norm
        self.tables = nn.ModuleList(nn.Embedding(size, embedding_dim, padding_idx=PAD)
                                    for size in vocab_sizes)
        self.numeric = nn.Linear(numeric, embedding_dim) if numeric else None
        width = embedding_dim * (len(vocab_sizes) + (1 if numeric else 0))
        self.project = nn.Linear(width, d_model)
        self.dropout = nn.Dropout(dropout)
        for table in self.tables:
            nn.init.normal_(table.weight, std=0.1)
            with torch.no_grad():
                table.weight[PAD].zero_()

    @classmethod
    def for_users(cls, space: FeatureSpace, d_model: int, *, embedding_dim: int = 16,
                  dropout: float = 0.0) -> FeatureEmbedding:
        """User features (user id first) -> (B, d)."""
        return cls("user", [v.size for v in space.user_cat.values()], len(space.user_num),
                   d_model, embedding_dim=embedding_dim, dropout=dropout)

    @classmethod
    def for_candidates(cls, space: FeatureSpace, d_model: int, *, embedding_dim: int = 16,
                       upstream_score: bool = True, upstream_norm: str = "request",
                       dropout: float = 0.0) -> FeatureEmbedding:
        """Candidate features (item id first), optionally the upstream score -> (B, N, d)."""
        return cls("candidate", [v.size for v in space.cand_cat.values()],
                   len(space.cand_num) + (1 if upstream_score else 0), d_model,
                   embedding_dim=embedding_dim, upstream_score=upstream_score,
                   upstream_norm=upstream_norm, dropout=dropout)

    def forward(self, batch: RequestBatch, index: torch.Tensor | None = None) -> torch.Tensor:
        """The user (B, d) or candidate (B, N, d) vectors of a batch.

        Args:
            index: candidates only: (B, L) candidate indices (in [0, N)) to embed, giving
                (B, L, d); only those rows are embedded (a model that reads a few lists out
                of many candidates need not embed them all).
        """
        if self.side == "user":
            return self.embed(batch.user_cat, batch.user_num)
        categorical, numeric = batch.cand_cat, batch.cand_num          # (B, N, Fc), (B, N, Gc)
        if self.upstream_score:
            score = batch.upstream_score                               # (B, N)
            if self.upstream_norm == "request":
                score = standardise(score, batch.cand_mask)            # over all N candidates
            numeric = torch.cat([numeric, score.unsqueeze(-1)], dim=-1)  # (B, N, Gc + 1)
        if index is not None:
            categorical = categorical.gather(
                1, index.unsqueeze(-1).expand(-1, -1, categorical.shape[-1]))  # (B, L, Fc)
            numeric = numeric.gather(1, index.unsqueeze(-1).expand(-1, -1, numeric.shape[-1]))
        return self.embed(categorical, numeric)

    def embed(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        """(..., F) long and (..., G) float -> (..., d)."""
        parts = [table(categorical[..., f]) for f, table in enumerate(self.tables)]
        if self.numeric is not None:
            parts.append(self.numeric(numeric))
        return self.dropout(self.project(torch.cat(parts, dim=-1)))


def personalised_inputs(config, space: FeatureSpace
                        ) -> tuple[FeatureEmbedding, FeatureEmbedding | None, nn.Linear | None]:
    """The input modules the generator and the evaluator share.

    Args:
        config: a model config with d_model, embedding_dim, use_upstream_score,
            upstream_norm, dropout, personalised and user_interaction.
        space: the feature space.
    Returns:
        the candidate embedding; the user embedding (None unless `personalised`); the
        projection of user * candidate added to each candidate (None unless also
        `user_interaction`).
    """
    d = config.d_model
    candidates = FeatureEmbedding.for_candidates(
        space, d, embedding_dim=config.embedding_dim, upstream_score=config.use_upstream_score,
        upstream_norm=config.upstream_norm, dropout=config.dropout)
    user = FeatureEmbedding.for_users(space, d, embedding_dim=config.embedding_dim,
                                      dropout=config.dropout) if config.personalised else None
    interaction = nn.Linear(d, d) if config.personalised and config.user_interaction else None
    return candidates, user, interaction


def standardise(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the real entries of each row; padding becomes 0.

    Args:
        values: (B, N) float.
        mask: (B, N) bool, True for real entries.
    """
    weight = mask.to(values.dtype)                                     # (B, N)
    count = weight.sum(1, keepdim=True).clamp(min=1)                   # (B, 1)
    mean = (values * weight).sum(1, keepdim=True) / count              # (B, 1)
    variance = (((values - mean) * weight) ** 2).sum(1, keepdim=True) / count
    scaled = (values - mean) / variance.sqrt().clamp(min=1e-6)         # (B, N)
    return scaled * weight


def key_padding_bias(padding: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, n) bool, True where padded -> (B, n) float, -inf there and 0 elsewhere: the
    key-padding mask nn.MultiheadAttention adds to its attention logits."""
    return torch.zeros(padding.shape, dtype=dtype, device=padding.device).masked_fill(
        padding, -torch.inf)


def attend(module: nn.MultiheadAttention, query: torch.Tensor, memory: torch.Tensor,
           key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """`module(query, memory, memory, key_padding_mask=key_bias)[0]`, computed batch-first
    with the module's own parameters through `F.scaled_dot_product_attention`.

    nn.MultiheadAttention's general path works sequence-first and copies every projection
    into that layout; this one keeps (B, heads, L, d / heads) views and lets PyTorch pick its
    fused CPU kernel: the same attention, about twice as fast on 2 cores (docs/benchmarks.md).

    Args:
        module: a batch-first nn.MultiheadAttention (its in_proj and out_proj are used).
        query: (B, L, d); memory: (B, S, d), the keys and values (may be `query` itself).
        key_bias: (B, S) added to the attention logits: 0, or -inf on padded keys; or
            (B, L, S), a bias per query (for example a causal mask on top of the padding).
    Returns:
        (B, L, d).
    """
    d, heads = module.embed_dim, module.num_heads
    weight, bias = module.in_proj_weight, module.in_proj_bias
    if query is memory:
        q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)       # (B, L, d) each
    else:
        q = F.linear(query, weight[:d], bias[:d])                       # (B, L, d)
        k, v = F.linear(memory, weight[d:], bias[d:]).chunk(2, dim=-1)  # (B, S, d) each
    batch, length, _ = q.shape
    q, k, v = (x.view(batch, -1, heads, d // heads).transpose(1, 2) for x in (q, k, v))
    mask = None if key_bias is None else (key_bias[:, None, None, :] if key_bias.dim() == 2
                                          else key_bias[:, None])  # (B, 1, 1 or L, S)
    dropout = module.dropout if module.training else 0.0
    if _few_keys(k, dropout):
        scores = q @ k.transpose(-1, -2) * (d // heads) ** -0.5       # (B, heads, L, S)
        out = (scores if mask is None else scores + mask).softmax(-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return module.out_proj(out.transpose(1, 2).reshape(batch, length, d))  # (B, L, d)


FEW_KEYS = 16


def _few_keys(keys: torch.Tensor, dropout: float) -> bool:
    """Whether `attend` computes attention as two batched products and a softmax instead of
    `scaled_dot_product_attention`: on the CPU, eagerly, without dropout, over at most
    FEW_KEYS keys. There PyTorch's fused CPU kernel works in blocks sized for long
    sequences and takes 2.5x as long (B = 1024 lists of 5 items: 10 against 4 ms); from 60
    keys on it is the faster one. Traced graphs (ONNX export, torch.compile) keep the fused
    operator whatever the example's size, since their key count is dynamic."""
    return (keys.shape[-2] <= FEW_KEYS and keys.device.type == "cpu" and dropout == 0.0
            and not torch.compiler.is_compiling())


def position_rows(table: nn.Embedding, length: int) -> torch.Tensor:
    """(length, d) the embeddings of positions 0..length-1; positions past the table's last
    row share it (a request at serving or test time may show a longer list than any in the
    training split, which sized the table)."""
    index = torch.arange(length, device=table.weight.device).clamp(max=table.num_embeddings - 1)
    return table.weight[index]
