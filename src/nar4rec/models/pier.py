"""PIER (Shi et al., "PIER: Permutation-Level Interest-Based End-to-End Re-ranking Framework in
E-commerce", KDD 2023): a generator-evaluator reranker whose two modules are trained together.

- Permutations: P lists of m candidates per request: the upstream top m, the top m by OCPM's
  point-wise utility, and P - 2 Plackett-Luce draws without replacement on the standardised
  upstream scores (the paper permutes the ranking stage's list; `proposal="model"` draws on
  the point-wise utility instead) divided by `temperature`.
- FPSM (fine-grained permutation selection): a user-interest vector and one vector per
  permutation (attention pooling of its items plus position embeddings, queried by the user
  vector) are hashed with SimHash (signs of a fixed Gaussian projection); the `top_k`
  permutations with the most bits equal to the user's are kept. The paper builds the interest
  from the user's time-aware behaviour sequence; our request logs have none, so it is an MLP
  of the user's feature embedding (a learned vector for an unpersonalised model).
- OCPM (omnidirectional context-aware prediction): self-attention over the whole permutation,
  both sides of every item, with a learned bias per head and per distance |i - j| added to the
  attention logits; one logit per behaviour per item. A permutation's score is its summed
  predicted utility sum_b w_b sigmoid(logit_b); the best kept permutation is shown.
- Training: OCPM by per-behaviour BCE on the logged lists (`evaluator_loss`). FPSM by the
  paper's contrastive loss, in our reading: of P' sampled permutations the one OCPM scores
  best (detached) is the positive, the others negatives; InfoNCE on the cosine of interest and
  permutation vectors over `contrast_temperature` (SimHash is not differentiable; its share of
  equal bits estimates the angle). Loss = OCPM loss + fpsm_weight * FPSM loss. FPSM reads the
  shared embeddings detached: letting its loss move them made OCPM a worse judge of lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nar4rec.data.batch import RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.decode import NO_ITEM
from nar4rec.models.base import (
    BaselineSystem,
    InputConfig,
    ListModel,
    Ranking,
    descending_order,
    padding_rows,
    predicted_utility,
    top_m,
)
from nar4rec.models.evaluator import evaluator_loss, predicted_list_utility
from nar4rec.models.layers import MLP, personalised_inputs, position_rows, standardise
from nar4rec.reranker import request_keys, request_uniforms

SIMHASH_SEED = 20230206   # the projection is a fixed function of this seed, never trained
PROPOSALS = ("upstream", "model")


@dataclass
class PIERConfig(InputConfig):
    """list_length: m. d_model, layers, heads, ff_mult: OCPM's width, attention + FFN layers,
    heads, FFN width d * ff_mult (NAR4Rec's evaluator sizes). permutations: P generated per
    request at inference (2 deterministic + P - 2 sampled). train_permutations: P' sampled per
    request to train FPSM. hash_bits: SimHash code length. top_k: permutations FPSM keeps for
    OCPM. temperature: of the Plackett-Luce draws. proposal: what they draw on, "upstream"
    scores or the "model"'s point-wise utilities (both standardised). contrast_temperature:
    of FPSM's InfoNCE on cosines. fpsm_weight: FPSM loss weight. seed: of the per-request
    uniforms of inference sampling."""

    list_length: int = 6
    d_model: int = 64
    layers: int = 1
    heads: int = 4
    ff_mult: int = 4
    permutations: int = 64
    train_permutations: int = 16
    hash_bits: int = 64
    top_k: int = 8
    temperature: float = 0.5
    proposal: str = "upstream"
    contrast_temperature: float = 0.1
    fpsm_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = self.check_inputs()
        for name in ("list_length", "layers", "heads", "ff_mult", "hash_bits", "top_k"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.heads >= 1 and self.d_model % self.heads:
            problems.append(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        for name in ("permutations", "train_permutations"):
            if getattr(self, name) < 2:
                problems.append(f"{name} must be >= 2 (two lists are deterministic), not "
                                f"{getattr(self, name)}")
        if self.top_k > self.permutations:
            problems.append(f"top_k ({self.top_k}) must be <= permutations ({self.permutations})")
        for name in ("temperature", "contrast_temperature"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, not {getattr(self, name)}")
        if self.proposal not in PROPOSALS:
            problems.append(f"proposal must be one of {PROPOSALS}, not {self.proposal!r}")
        if self.fpsm_weight < 0:
            problems.append(f"fpsm_weight must be >= 0, not {self.fpsm_weight}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class PIEROutput:
    """What training needs: logits (B, M, K) of OCPM on the logged lists; similarity (B, P')
    FPSM's cosines of the sampled permutations; utility (B, P') OCPM's detached scores."""

    logits: torch.Tensor
    similarity: torch.Tensor
    utility: torch.Tensor


class DistanceAwareAttention(nn.Module):
    """OCPM's omnidirectional attention: every item attends to the whole permutation, with a
    learned scalar per head and per distance |i - j| added to the attention logits."""

    def __init__(self, d: int, heads: int, max_length: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.distance_bias = nn.Parameter(torch.zeros(heads, max_length))   # (H, m)

    def forward(self, h: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """h (S, m, d), padding (S, m) True on keys to ignore -> (S, m, d)."""
        count, m, d = h.shape
        q, k, v = self.qkv(h).reshape(count, m, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)                                    # 3 x (S, H, m, d / H)
        position = torch.arange(m, device=h.device)
        distance = (position[:, None] - position[None, :]).abs().clamp(
            max=self.distance_bias.shape[1] - 1)                      # (m, m)
        bias = torch.where(padding[:, None, None, :], -torch.inf,
                           self.distance_bias[:, distance])           # (S, H, m, m)
        # the attention written out: over m keys as fast as the fused kernel, and a graph the
        # ONNX exporter takes (its decomposition of the fused one fails on this bias)
        scores = q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5 + bias   # (S, H, m, m)
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        return self.out((weights @ v).transpose(1, 2).reshape(count, m, d))


class OCPMLayer(nn.Module):
    """Pre-LayerNorm distance-aware self-attention, then FFN."""

    def __init__(self, config: PIERConfig):
        super().__init__()
        d = config.d_model
        self.attention = DistanceAwareAttention(d, config.heads, config.list_length,
                                                config.dropout)
        self.ffn = MLP(d, [d * config.ff_mult], d, dropout=config.dropout)
        self.attention_norm = nn.LayerNorm(d)
        self.ffn_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """h (S, m, d), padding (S, m) -> (S, m, d)."""
        h = h + self.dropout(self.attention(self.attention_norm(h), padding))
        return h + self.dropout(self.ffn(self.ffn_norm(h)))


class PIER(ListModel):
    """FPSM selects top_k of P generated permutations by SimHash; OCPM picks the best of them."""

    def __init__(self, config: PIERConfig, space: FeatureSpace):
        super().__init__()
        self.config = config
        d = config.d_model
        self.candidates, self.user, self.interaction = personalised_inputs(config, space)
        # OCPM
        self.positions = nn.Embedding(config.list_length, d)
        self.blocks = nn.ModuleList(OCPMLayer(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(d)
        self.heads = nn.Linear(d, len(space.behaviours))   # one logit per behaviour
        # FPSM
        self.interest = MLP(d, [d], d) if self.user is not None else None
        self.anonymous_interest = nn.Parameter(torch.randn(d) * 0.1) if self.user is None \
            else None
        self.fpsm_positions = nn.Embedding(config.list_length, d)
        self.pool_key = nn.Linear(d, d)
        self.pool_value = nn.Linear(d, d)
        for table in (self.positions, self.fpsm_positions):
            nn.init.normal_(table.weight, std=0.1)
        planes = torch.randn(d, config.hash_bits,
                             generator=torch.Generator().manual_seed(SIMHASH_SEED))
        self.register_buffer("hash_planes", planes)                   # (d, bits), saved
        self.register_buffer("weights", space.utility_weights.float(), persistent=False)

    def embed(self, batch: RequestBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every candidate (B, n, d), embedded once per batch, and the user (B, d) or None."""
        return self.candidates(batch), self.user(batch) if self.user is not None else None

    def ocpm(self, items: torch.Tensor, user: torch.Tensor | None, lists: torch.Tensor,
             list_mask: torch.Tensor) -> torch.Tensor:
        """OCPM: (B, L, m, K) behaviour logits of every item of lists (B, L, m) (mask (B, L, m))."""
        batch_size, count, m = lists.shape
        h = gather_items(items, lists)                                 # (B, L, m, d)
        if user is not None:
            user = user[:, None, None, :]                              # (B, 1, 1, d)
            if self.interaction is not None:
                h = h + self.interaction(user * h)
            h = h + user
        h = (h + position_rows(self.positions, m)).flatten(0, 1)      # (B * L, m, d)
        padding = padding_rows(list_mask.flatten(0, 1))                # (B * L, m)
        for block in self.blocks:
            h = block(h, padding)                                      # (B * L, m, d)
        return self.heads(self.norm(h)).view(batch_size, count, m, -1)  # (B, L, m, K)

    def pointwise_utility(self, items: torch.Tensor, user: torch.Tensor | None,
                          cand_mask: torch.Tensor) -> torch.Tensor:
        """(B, n) each candidate's OCPM utility alone at position 0; -inf on padding."""
        batch_size, n, _ = items.shape
        alone = torch.arange(n, device=items.device).expand(batch_size, n).unsqueeze(-1)
        logits = self.ocpm(items, user, alone, cand_mask.unsqueeze(-1))[:, :, 0]  # (B, n, K)
        return predicted_utility(logits, self.weights).masked_fill(~cand_mask, -torch.inf)

    def generate(self, batch: RequestBatch, scores: torch.Tensor,
                 uniforms: torch.Tensor) -> torch.Tensor:
        """(B, 2 + S, m): the upstream top m, the top m by `scores` (B, n), then one
        Plackett-Luce draw per row of uniforms (B, S, m)."""
        m, mask = self.config.list_length, batch.cand_mask
        base = batch.upstream_score if self.config.proposal == "upstream" else scores
        logits = standardise(base.masked_fill(~mask, 0.0), mask) / self.config.temperature
        anchors = torch.stack([top_m(batch.upstream_score, mask, m), top_m(scores, mask, m)], 1)
        return torch.cat([anchors, plackett_luce(logits, mask, uniforms)], dim=1)

    def fpsm(self, items: torch.Tensor, user: torch.Tensor | None, lists: torch.Tensor,
             list_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FPSM's user-interest (B, d) and permutation vectors (B, L, d) of lists (B, L, m),
        from the shared embeddings detached (FPSM's loss trains FPSM's own layers only)."""
        if user is None:
            interest = self.anonymous_interest.expand(len(items), -1)   # (B, d)
        else:
            interest = self.interest(user.detach())                     # (B, d)
        m = lists.shape[2]
        h = gather_items(items.detach(), lists) + position_rows(self.fpsm_positions, m)
        attention = (self.pool_key(h) @ interest[:, None, :, None]).squeeze(-1)  # (B, L, m)
        attention = attention.masked_fill(padding_rows(list_mask), -torch.inf)
        attention = (attention / h.shape[-1] ** 0.5).softmax(-1)       # (B, L, m)
        return interest, (attention.unsqueeze(-1) * self.pool_value(h)).sum(2)  # (B, L, d)

    def select(self, items: torch.Tensor, user: torch.Tensor | None, lists: torch.Tensor
               ) -> torch.Tensor:
        """(B, top_k) indices of the permutations (B, P, m) whose SimHash codes share the most
        bits with the user's; ties go to the lower index."""
        interest, permutation = self.fpsm(items, user, lists, lists >= 0)
        similarity = hash_similarity(simhash(interest, self.hash_planes).unsqueeze(1),
                                     simhash(permutation, self.hash_planes))  # (B, P)
        return descending_order(similarity, min(self.config.top_k, similarity.shape[1]))

    def forward(self, batch: RequestBatch) -> PIEROutput:
        items, user = self.embed(batch)
        logged = self.ocpm(items, user, batch.exposed.unsqueeze(1),
                           batch.exposed_mask.unsqueeze(1))[:, 0]      # (B, M, K)
        with torch.no_grad():   # OCPM guides FPSM; FPSM does not train OCPM
            scores = self.pointwise_utility(items, user, batch.cand_mask)  # (B, n)
            uniforms = torch.rand(len(items), self.config.train_permutations - 2,
                                  self.config.list_length, device=items.device)
            lists = self.generate(batch, scores, uniforms)              # (B, P', m)
            utility = predicted_list_utility(self.ocpm(items, user, lists, lists >= 0),
                                             self.weights, lists >= 0)  # (B, P')
        interest, permutation = self.fpsm(items, user, lists, lists >= 0)
        similarity = F.cosine_similarity(interest.unsqueeze(1), permutation, dim=-1)  # (B, P')
        return PIEROutput(logged, similarity, utility)

    def loss(self, outputs: PIEROutput, batch: RequestBatch
             ) -> tuple[torch.Tensor, dict[str, float]]:
        ocpm_loss = evaluator_loss(outputs.logits, batch.feedback, batch.exposed_mask)
        fpsm_loss = F.cross_entropy(outputs.similarity / self.config.contrast_temperature,
                                    outputs.utility.argmax(1))          # OCPM's best = positive
        loss = ocpm_loss + self.config.fpsm_weight * fpsm_loss
        return loss, {"bce": float(ocpm_loss.detach()), "fpsm": float(fpsm_loss.detach())}

    def proposals(self, batch: RequestBatch, items: torch.Tensor, user: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference's point-wise utilities (B, n) and P permutations (B, P, m), the draws from
        each request's own uniforms (the same in any batch)."""
        scores = self.pointwise_utility(items, user, batch.cand_mask)  # (B, n)
        keys = request_keys(batch.user_cat, batch.cand_cat, batch.cand_mask)
        uniforms = request_uniforms(keys, self.config.seed, self.config.permutations - 2,
                                    self.config.list_length)            # (B, P - 2, m)
        return scores, self.generate(batch, scores, uniforms)          # (B, n), (B, P, m)

    @torch.no_grad()
    def rerank(self, batch: RequestBatch) -> Ranking:
        items, user = self.embed(batch)
        scores, lists = self.proposals(batch, items, user)              # (B, n), (B, P, m)
        kept = self.select(items, user, lists)                          # (B, k)
        kept_lists = lists.gather(1, kept.unsqueeze(-1).expand(-1, -1, lists.shape[2]))
        utility = predicted_list_utility(self.ocpm(items, user, kept_lists, kept_lists >= 0),
                                         self.weights, kept_lists >= 0)  # (B, k)
        best = utility.argmax(1)                                        # first of ties
        return Ranking(kept_lists[torch.arange(len(kept_lists), device=best.device), best], scores)

    @torch.no_grad()
    def logged_click(self, batch: RequestBatch) -> torch.Tensor:
        items, user = self.embed(batch)
        logits = self.ocpm(items, user, batch.exposed.unsqueeze(1), batch.exposed_mask.unsqueeze(1))
        return torch.sigmoid(logits[:, 0, :, 0])                        # (B, M)


def gather_items(items: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """Candidate vectors (B, n, d) of lists (B, L, m) -> (B, L, m, d); NO_ITEM reads row 0."""
    batch_size, count, m = lists.shape
    index = lists.clamp(0, items.shape[1] - 1).reshape(batch_size, count * m, 1)
    return items.gather(1, index.expand(-1, -1, items.shape[-1])).view(batch_size, count, m, -1)


def plackett_luce(logits: torch.Tensor, cand_mask: torch.Tensor,
                  uniforms: torch.Tensor) -> torch.Tensor:
    """Lists drawn without replacement, p(i) proportional to exp(logit_i) over the unused real
    candidates, by inverse-CDF sampling from the given uniforms (a request's draws depend on its
    own numbers only).

    Args:
        logits: (B, n). cand_mask: (B, n) True on real candidates.
        uniforms: (B, S, m) numbers in (0, 1), one per draw and position.
    Returns:
        (B, S, m) candidate indices, NO_ITEM once a request has run out of candidates.
    """
    batch_size, draws, m = uniforms.shape
    n = logits.shape[1]
    available = cand_mask.unsqueeze(1).expand(batch_size, draws, n).clone()  # (B, S, n)
    lists = torch.full((batch_size, draws, m), NO_ITEM, dtype=torch.long, device=logits.device)
    for position in range(min(m, n)):
        masked = logits.unsqueeze(1).masked_fill(~available, -torch.inf)      # (B, S, n)
        top = masked.amax(-1, keepdim=True).nan_to_num(neginf=0.0)           # (B, S, 1)
        cdf = (masked - top).exp().double().cumsum(-1)                        # (B, S, n)
        target = uniforms[..., position].double() * cdf[..., -1]              # (B, S)
        picked = (cdf <= target.unsqueeze(-1)).sum(-1).clamp_max(n - 1)       # (B, S)
        rounded_off = ~available.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
        picked = torch.where(rounded_off, masked.argmax(-1), picked)          # float rounding
        has_any = available.any(-1)                                           # (B, S)
        lists[..., position] = torch.where(has_any, picked, NO_ITEM)
        available.scatter_(-1, picked.unsqueeze(-1), False)
    return lists


def simhash(vectors: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., bits) bool: the side of each random hyperplane (Charikar's SimHash)."""
    return vectors @ planes > 0


def hash_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of equal bits of broadcastable codes (..., bits) -> (...): bits - Hamming."""
    return (a == b).sum(-1)


class PIERSystem(BaselineSystem, section="pier", model_class=PIER):
    """PIER behind the `system.System` interface (registered as "pier")."""
