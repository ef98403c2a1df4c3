"""Edge-rerank (Gong et al., "Real-time Short Video Recommendation on Mobile Devices", CIKM
2022, section 5), the NAR4Rec paper's online baseline.

A context-aware item model predicts an item's behaviours given the user, the slot it would
take and the items already placed above it (the "ranking context" c(i) of Gong et al.'s
eq. 1): the item and its slot embedding query a multi-head target attention over the placed
items (each with its own slot embedding) and a learned empty-prefix token, and an MLP maps
[user, query, attended context] to one logit per behaviour. Training is per-behaviour binary
cross-entropy on the logged lists, every position attending to the positions above it in one
causal pass. A list is built slot by slot by beam search over these context-aware scores,
maximising the list's summed predicted utility sum_i sum_b w_b sigmoid(logit_b) (their
ListReward, eq. 4, without the has_next survival discount: our data has no such behaviour).

"Adaptive" beam search: Gong et al. motivate it by the relative ListReward difference between
beams at each search step (their Table 5); the exact rule is not available to us, so we read it
as relative-threshold pruning (Freitag and Al-Onaizan, "Beam Search Strategies for Neural
Machine Translation", 2017): an expansion whose cumulative utility falls below the step's best
by more than `prune_margin` times the best is dropped, so a request keeps fewer than
`beam_width` beams when one prefix clearly dominates (0 turns pruning off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nar4rec.data.batch import RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.decode import NO_ITEM, beam_origin
from nar4rec.models.base import (
    BaselineSystem,
    InputConfig,
    ListModel,
    Ranking,
    feedback_loss,
    logged_index,
    predicted_utility,
)
from nar4rec.models.layers import MLP, personalised_inputs, position_rows


@dataclass
class EdgeRerankConfig(InputConfig):
    """list_length: m (rows of the slot embedding table). d_model: width of user, item and
    slot vectors. heads: heads of the target attention over the placed items. hidden: the
    head MLP's layers. beam_width: beams kept per request (1 is greedy). prune_margin: drop
    expansions below (1 - prune_margin) * the step's best cumulative utility (0: off)."""

    list_length: int = 6
    d_model: int = 64
    heads: int = 4
    hidden: tuple[int, ...] = (128,)
    beam_width: int = 4
    prune_margin: float = 0.0

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        problems = self.check_inputs()
        if self.list_length < 1:
            problems.append(f"list_length must be >= 1, not {self.list_length}")
        if self.heads < 1 or self.d_model % self.heads:
            problems.append(f"d_model ({self.d_model}) must be a multiple of heads "
                            f"({self.heads} >= 1)")
        if any(h < 1 for h in self.hidden):
            problems.append(f"hidden sizes must be >= 1, not {self.hidden}")
        if self.beam_width < 1:
            problems.append(f"beam_width must be >= 1, not {self.beam_width}")
        if not self.prune_margin >= 0.0:
            problems.append(f"prune_margin must be >= 0, not {self.prune_margin}")
        if problems:
            raise ValueError("; ".join(problems))


class EdgeRerank(ListModel):
    """Context-aware behaviour logits of an item given the items above it, and beam search.

    Args:
        config: the architecture and the search.
        space: the feature space (vocabulary sizes, behaviours K, utility weights).
    """

    def __init__(self, config: EdgeRerankConfig, space: FeatureSpace):
        super().__init__()
        self.config = config
        d = config.d_model
        self.candidates, self.user, self.interaction = personalised_inputs(config, space)
        self.slots = nn.Embedding(config.list_length, d)
        nn.init.normal_(self.slots.weight, std=0.1)
        self.empty = nn.Parameter(torch.randn(d) * 0.1)   # the context of the first slot
        self.attention = nn.MultiheadAttention(d, config.heads, dropout=config.dropout,
                                               batch_first=True)
        width = d * (3 if self.user is not None else 2)
        self.head = MLP(width, config.hidden, len(space.behaviours), dropout=config.dropout,
                        activation="relu")
        self.register_buffer("weights", space.utility_weights.float(), persistent=False)

    def items(self, batch: RequestBatch, index: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, d) vectors of candidates `index` (B, L) or of all, and the user (B, d)."""
        items = self.candidates(batch, index)                          # (B, L, d)
        if self.user is None:
            return items, None
        user = self.user(batch)                                        # (B, d)
        if self.interaction is not None:
            items = items + self.interaction(user[:, None, :] * items)
        return items, user

    def context(self, placed: torch.Tensor, placed_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention keys of the placed items (S, P, d), slots 0..P-1, behind the empty token:
        (S, 1 + P, d) keys and (S, 1 + P) key padding (True on unplaced entries)."""
        rows, placed_count, d = placed.shape
        keys = torch.cat([self.empty.expand(rows, 1, d),
                          placed + position_rows(self.slots, placed_count)], dim=1)  # (S, 1 + P, d)
        padding = torch.cat([placed_mask.new_zeros(rows, 1), ~placed_mask], dim=1)
        return keys, padding

    def logits_of(self, queries: torch.Tensor, user: torch.Tensor | None, keys: torch.Tensor,
                  padding: torch.Tensor, causal: torch.Tensor | None = None) -> torch.Tensor:
        """Behaviour logits of items in context.

        Args:
            queries: (S, L, d) item + slot vectors of the items scored.
            user: (S, d) or None.
            keys, padding: `context`'s output, (S, 1 + P, d) and (S, 1 + P).
            causal: (L, 1 + P) True where query l may not see key p, or None.
        Returns:
            (S, L, K) logits.
        """
        attended = self.attention(queries, keys, keys, key_padding_mask=padding,
                                  attn_mask=causal, need_weights=False)[0]  # (S, L, d)
        parts = [queries, attended]
        if user is not None:
            parts.insert(0, user[:, None, :].expand_as(queries))
        return self.head(torch.cat(parts, dim=-1))                     # (S, L, K)

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        """(B, M, K) logits of the logged items, each given the logged items above it."""
        length = batch.exposed.shape[1]
        items, user = self.items(batch, logged_index(batch))           # (B, M, d)
        keys, padding = self.context(items, batch.exposed_mask)        # (B, 1 + M, d)
        # slot j sees the empty token (key 0) and slots < j (keys 1..j)
        causal = torch.ones(length, length + 1, dtype=torch.bool,
                            device=items.device).triu(1)               # (M, 1 + M)
        return self.logits_of(items + position_rows(self.slots, length), user, keys, padding,
                              causal)

    def loss(self, outputs: torch.Tensor, batch: RequestBatch
             ) -> tuple[torch.Tensor, dict[str, float]]:
        return feedback_loss(outputs, batch)

    @torch.no_grad()
    def rerank(self, batch: RequestBatch) -> Ranking:
        """Adaptive beam search over the context-aware utilities; scores: each candidate's
        utility at the first slot (empty context)."""
        cand_mask = batch.cand_mask
        batch_size, n = cand_mask.shape
        width, m = self.config.beam_width, self.config.list_length
        device = cand_mask.device
        items, user = self.items(batch)                                # (B, n, d)
        d = items.shape[-1]
        beam_user = None if user is None else \
            user[:, None, :].expand(batch_size, width, d).reshape(batch_size * width, d)
        rows = torch.arange(batch_size, device=device)[:, None, None]  # (B, 1, 1)
        beams = torch.arange(width, device=device).expand(batch_size, width)  # (B, W)
        real = cand_mask.sum(dim=1)                                    # (B,)
        score = torch.full((batch_size, width), -torch.inf, device=device)   # (B, W)
        score[:, 0] = 0.0   # one live beam at the start, so that no two beams are the same list
        used = (~cand_mask)[:, None, :].expand(batch_size, width, n).clone()  # (B, W, n)
        prefixes = torch.zeros((batch_size, width, 0), dtype=torch.long, device=device)
        scores = torch.full((batch_size, n), -torch.inf, device=device)
        for position in range(min(m, n)):
            queries = (items + self.slots.weight[position])[:, None].expand(
                batch_size, width, n, d).reshape(batch_size * width, n, d)  # (B * W, n, d)
            placed = items[rows, prefixes.clamp_min(0)]                # (B, W, j, d)
            keys, padding = self.context(placed.reshape(batch_size * width, position, d),
                                         (prefixes >= 0).reshape(batch_size * width, position))
            logits = self.logits_of(queries, beam_user, keys, padding)  # (B * W, n, K)
            utility = predicted_utility(logits, self.weights).view(batch_size, width, n)
            if position == 0:
                scores = utility[:, 0].masked_fill(~cand_mask, -torch.inf)  # (B, n)
            extended = (score[:, :, None] + utility).masked_fill(used, -torch.inf)
            extended = extended.reshape(batch_size, width * n)         # (B, W * n)
            if self.config.prune_margin > 0:
                best = extended.amax(dim=1, keepdim=True)              # (B, 1)
                pruned = extended < best - self.config.prune_margin * best.abs()
                extended = extended.masked_fill(pruned, -torch.inf)
            top, flat = extended.topk(width, dim=1)                    # (B, W)
            parent, item = beam_origin(flat, n)
            active = (position < real)[:, None]                        # (B, 1)
            parent = torch.where(active, parent, beams)
            item = torch.where(active, item, NO_ITEM)
            score = torch.where(active, top, score)
            prefixes = torch.cat([prefixes.gather(1, parent[..., None].expand(-1, -1, position)),
                                  item[..., None]], dim=2)             # (B, W, j + 1)
            used = used.gather(1, parent[..., None].expand(-1, -1, n))
            used.scatter_(2, item.clamp_min(0)[..., None], True)
        lists = torch.full((batch_size, m), NO_ITEM, dtype=torch.long, device=device)
        if prefixes.shape[2]:
            lists[:, :prefixes.shape[2]] = prefixes[rows[:, 0, 0], score.argmax(dim=1)]
        return Ranking(lists, scores)

    feedback_model = True

    @torch.no_grad()
    def logged_click(self, batch: RequestBatch) -> torch.Tensor:
        return torch.sigmoid(self(batch)[..., 0])                      # (B, M)


class EdgeRerankSystem(BaselineSystem, section="edge_rerank", model_class=EdgeRerank):
    """EdgeRerank behind the `system.System` interface (registered as "edge_rerank")."""
