"""Seq2Slate (Bello, Kulkarni, Jain, Boutilier, Chi, Eban, Luo, Mackey, Meshi, "Seq2Slate:
Re-ranking and Slate Optimization with RNNs", 2018), the paper's autoregressive baseline.

A pointer network (Vinyals, Fortunato, Jaitly, 2015). An LSTM encoder reads the candidates in
their initial order (the ranking stage's: descending upstream score, padding last, so trailing
padding never changes a real candidate's state); an LSTM decoder starts from the encoder's final
state and a learned "go" input, and at step j takes the vector of the item chosen last. Its
state d_j points at the candidates with additive attention, p_j(i) ∝ exp(v^T tanh(W_enc e_i +
W_dec d_j)) (section 3 of the Seq2Slate paper), over the candidates not chosen yet.

Training is the supervised variant (section 4.2), teacher-forced on target lists: the logged
list reordered by observed utility (clicked items first, ties in the logged order). The loss at
step j is the cross-entropy between p_j and the observed utilities of the items not placed
before j, normalised to a distribution (`target="labels"`, the paper's); it runs over the steps
that still have utility to place, so the steps past the last engaged item, and lists without
one, add nothing (and cost no decoder step). `target="sequence"` instead asks for the target
list's next item at every step of the logged list, those past the engaged items included
(their order is the logging policy's). Personalisation: the user
vector is added to every candidate vector (plus, with `user_interaction`, a projection of
user * item), so the encoder, the pointer keys and the decoder inputs all see the user.
Decoding is greedy (beam search of width 1) or beam search, one position at a time: the
autoregressive cost NAR4Rec avoids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nar4rec.data.batch import RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.decode import NO_ITEM, beam_origin
from nar4rec.errors import Nar4recError
from nar4rec.models.base import (
    BaselineSystem,
    InputConfig,
    ListModel,
    Ranking,
    initial_order,
    item_utility_targets,
    logged_index,
)
from nar4rec.models.layers import personalised_inputs

DECODINGS = ("greedy", "beam")
TARGETS = ("labels", "sequence")


@dataclass
class Seq2SlateConfig(InputConfig):
    """list_length: m. d_model: width of the candidate vectors, of both LSTMs and of the
    pointer attention (NAR4Rec's hidden size). decoding: "greedy" or "beam". beam_width: beams
    per request for "beam". target: "labels" (each step's target distribution is the remaining
    items' observed utility) or "sequence" (the target list's next item, every step).
    positive_only: with "sequence", train on lists with observed utility > 0 only (the others'
    target is just the logged order)."""

    list_length: int = 6
    d_model: int = 64
    decoding: str = "greedy"
    beam_width: int = 4
    target: str = "labels"
    positive_only: bool = True

    def __post_init__(self) -> None:
        problems = self.check_inputs()
        if self.list_length < 1:
            problems.append(f"list_length must be >= 1, not {self.list_length}")
        if self.d_model < 1:
            problems.append(f"d_model must be >= 1, not {self.d_model}")
        if self.decoding not in DECODINGS:
            problems.append(f"decoding must be one of {DECODINGS}, not {self.decoding!r}")
        if self.target not in TARGETS:
            problems.append(f"target must be one of {TARGETS}, not {self.target!r}")
        if self.beam_width < 1:
            problems.append(f"beam_width must be >= 1, not {self.beam_width}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Decoded:
    """What decoding B requests gives: lists (B, m); exposure (B, n), each candidate's summed
    pointer probability along the decoded path; first (B, n), the first step's log-probabilities;
    log_prob (B,), the decoded list's log-probability sum_j log p_j(y_j)."""

    lists: torch.Tensor
    exposure: torch.Tensor
    first: torch.Tensor
    log_prob: torch.Tensor


class Seq2Slate(ListModel):
    """Pointer network over the candidates, trained with teacher forcing (supervised variant)."""

    def __init__(self, config: Seq2SlateConfig, space: FeatureSpace):
        super().__init__()
        self.config = config
        d = config.d_model
        self.candidates, self.user, self.interaction = personalised_inputs(config, space)
        self.encoder = nn.LSTM(d, d, batch_first=True)
        self.decoder = nn.LSTM(d, d, batch_first=True)
        self.go = nn.Parameter(torch.randn(d) * 0.1)
        self.key = nn.Linear(d, d, bias=False)                          # W_enc
        self.query = nn.Linear(d, d)                                    # W_dec
        self.pointer = nn.Linear(d, 1, bias=False)                      # v
        self.register_buffer("weights", space.utility_weights.float(), persistent=False)

    def encode(self, batch: RequestBatch
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Candidate vectors (B, n, d), pointer keys W_enc e_i (B, n, d) in candidate order, and
        the encoder's final state ((1, B, d), (1, B, d)) after each request's last real one."""
        mask = batch.cand_mask                                          # (B, n)
        items = self.candidates(batch)                                  # (B, n, d)
        if self.user is not None:
            user = self.user(batch).unsqueeze(1).expand_as(items)       # (B, n, d)
            if self.interaction is not None:
                items = items + self.interaction(user * items)
            items = items + user
        order = initial_order(batch)                                    # (B, n) initial order
        d = items.shape[-1]
        packed = pack_padded_sequence(items.gather(1, order[..., None].expand(-1, -1, d)),
                                      mask.sum(1).clamp_min(1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        states, final = self.encoder(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=mask.shape[1])
        back = order.argsort(dim=1)[..., None].expand(-1, -1, d)       # (B, n, d)
        return items, self.key(states.gather(1, back)), final

    def point(self, keys: torch.Tensor, queries: torch.Tensor, blocked: torch.Tensor
              ) -> torch.Tensor:
        """Pointer log-probabilities (B, S, n) of S decoder states (B, S, d) over the keys
        (B, n, d); `blocked` (B, S, n) or broadcastable candidates get -inf (a row with every
        candidate blocked stays finite, to be masked by the caller)."""
        logits = self.pointer(torch.tanh(keys[:, None] + self.query(queries)[:, :, None]))
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        return logits.squeeze(-1).masked_fill(blocked, -torch.inf).log_softmax(-1)  # (B, S, n)

    def targets(self, batch: RequestBatch
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target lists (B, S): the logged items by observed utility, highest first, ties in
        logged order; (B, S) True on real steps (a shown, real, not repeated candidate); (B, S)
        each step's item's observed utility, 0 past the real steps. S is M for "sequence", the
        most steps any list needs to place its engaged items for "labels"."""
        utility = item_utility_targets(batch.feedback, self.weights)    # (B, M)
        order = utility.masked_fill(~batch.exposed_mask, -torch.inf).argsort(
            dim=1, descending=True, stable=True)                        # (B, M)
        target = logged_index(batch).gather(1, order)                   # (B, M)
        real = batch.exposed_mask.gather(1, order) & batch.cand_mask.gather(1, target)
        seen = F.one_hot(target, batch.cand_mask.shape[1]) * real[..., None]  # (B, M, n)
        before = (seen.cumsum(1) - seen).gather(2, target[..., None]).squeeze(-1)  # (B, M)
        real = real & (before == 0)
        gain = utility.gather(1, order).clamp_min(0.0) * real           # (B, M)
        if self.config.target == "labels":
            steps = max(int((gain > 0).sum(1).max()), 1)
            target, real, gain = target[:, :steps], real[:, :steps], gain[:, :steps]
        return target, real, gain

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        """Teacher-forced log-probabilities (B, S, n) on the target lists."""
        target, real, _ = self.targets(batch)                           # (B, S)
        return self.forced(batch, target, real)

    def forced(self, batch: RequestBatch, target: torch.Tensor, real: torch.Tensor
               ) -> torch.Tensor:
        """Log-probabilities (B, S, n): row j is p_j over the candidates given the first j
        items of the lists `target` (B, S) where `real` (all steps in one decoder call, one
        pointer op)."""
        items, keys, state = self.encode(batch)
        d = items.shape[-1]
        fed = items.gather(1, target[:, :-1, None].expand(-1, -1, d))   # (B, M - 1, d)
        inputs = torch.cat([self.go.expand(len(items), 1, d), fed], 1)  # (B, M, d)
        states, _ = self.decoder(inputs, state)                         # (B, M, d)
        seen = F.one_hot(target, keys.shape[1]) * real[..., None]       # (B, M, n)
        chosen = (seen.cumsum(1) - seen).bool()                         # before step j
        return self.point(keys, states, chosen | ~batch.cand_mask[:, None])

    def loss(self, outputs: torch.Tensor, batch: RequestBatch
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean per-step cross-entropy over the steps that train: "labels", -sum_k y_jk log
        p_j(target_k) with y_j the utilities of target items k >= j over their sum, on steps
        with some utility left; "sequence", -log p_j(target_j) on every real step."""
        target, real, gain = self.targets(batch)                        # (B, S)
        if self.config.target == "labels":
            later = torch.ones(target.shape[1], target.shape[1], dtype=torch.bool,
                               device=target.device).triu()            # (S, S) k >= j
            weight = gain[:, None, :] * later                           # (B, S, S) y_jk * total
            left = weight.sum(-1)                                       # (B, S)
            real = left > 0
            picked = outputs.gather(2, target[:, None, :].expand(-1, target.shape[1], -1))
            picked = (picked.masked_fill(weight == 0, 0.0) * weight).sum(-1) / left.clamp_min(
                1e-12)                                                  # (B, S)
        else:
            if self.config.positive_only:
                real = real & (gain.sum(1, keepdim=True) > 0)
            picked = outputs.gather(2, target[..., None]).squeeze(-1)   # (B, M)
        # 0, with a graph, when no list trains (other steps' log-probabilities may be -inf)
        loss = -picked.masked_fill(~real, 0.0).sum() / real.sum().clamp_min(1)
        return loss, {"ce": float(loss.detach())}

    @torch.no_grad()
    def decode(self, batch: RequestBatch, width: int) -> Decoded:
        """Beam search of `width` beams per request (1: greedy), all B * width beams advancing
        together: each beam is extended by every candidate it has not used, and the `width`
        best extensions of each request by sum_j log p_j survive."""
        items, keys, (h, c) = self.encode(batch)
        batch_size, n, d = items.shape
        mask, m = batch.cand_mask, self.config.list_length
        real = mask.sum(1, keepdim=True)                                # (B, 1)
        beams = torch.arange(width, device=items.device).expand(batch_size, width)  # (B, W)
        offset = torch.arange(batch_size, device=items.device)[:, None] * width  # (B, 1)
        score = torch.full((batch_size, width), -torch.inf, device=items.device)
        score[:, 0] = 0.0    # one live beam at the start, so that no two beams are the same list
        used = (~mask)[:, None].expand(-1, width, -1).clone()           # (B, W, n)
        exposure = torch.zeros(batch_size, width, n, device=items.device)
        lists = torch.full((batch_size, width, m), NO_ITEM, dtype=torch.long,
                           device=items.device)
        h, c = h.repeat_interleave(width, 1), c.repeat_interleave(width, 1)  # (1, B W, d)
        inputs = self.go.expand(batch_size * width, 1, d)               # (B W, 1, d)
        first = None
        for step in range(m):
            states, (h, c) = self.decoder(inputs, (h, c))               # (B W, 1, d)
            log_p = self.point(keys, states.view(batch_size, width, d), used)  # (B, W, n)
            log_p = log_p.masked_fill(used, -torch.inf)
            first = log_p[:, 0] if first is None else first             # (B, n)
            extended = (score[..., None] + log_p).view(batch_size, width * n)
            best, flat = extended.topk(width, dim=1)                    # (B, W)
            active = step < real                                        # (B, 1)
            parent, item = beam_origin(flat, n)
            parent = torch.where(active, parent, beams)                 # (B, W)
            item = torch.where(active, item, NO_ITEM)                   # (B, W)
            score = torch.where(active, best, score)
            exposure = (exposure + log_p.exp()).gather(1, parent[..., None].expand(-1, -1, n))
            used = used.gather(1, parent[..., None].expand(-1, -1, n))
            used.scatter_(2, item.clamp_min(0)[..., None], True)
            lists = lists.gather(1, parent[..., None].expand(-1, -1, m))
            lists[:, :, step] = item
            rows = (parent + offset).view(-1)                           # (B W,) parent beams
            h, c = h[:, rows], c[:, rows]
            inputs = items.gather(1, item.clamp_min(0)[..., None].expand(-1, -1, d)).view(
                batch_size * width, 1, d)
        winner = score.argmax(1)                                        # (B,)
        request = torch.arange(batch_size, device=items.device)
        return Decoded(lists[request, winner], exposure[request, winner].clamp(0, 1),
                       first, score[request, winner])

    @torch.no_grad()
    def rerank(self, batch: RequestBatch) -> Ranking:
        """The decoded list; scores rank the placed candidates by position (m - position, all
        >= 1), then the others by their first-step log-probability (< 0), -inf on padding;
        exposure: each candidate's pointer probability summed over the decoded path's steps."""
        width = self.config.beam_width if self.config.decoding == "beam" else 1
        decoded = self.decode(batch, width)
        lists, (batch_size, n), m = decoded.lists, batch.cand_mask.shape, self.config.list_length
        slot = torch.where(lists >= 0, lists, n)                        # (B, m), n: no item
        rank = torch.arange(m, 0, -1, dtype=decoded.first.dtype, device=lists.device)
        placed = decoded.first.new_zeros(batch_size, n + 1).scatter_(
            1, slot, rank.expand(batch_size, m))[:, :n]                 # (B, n) m - position
        scores = torch.where(placed > 0, placed, decoded.first)
        scores = scores.masked_fill(~batch.cand_mask, -torch.inf)
        return Ranking(lists, scores, decoded.exposure.masked_fill(~batch.cand_mask, 0.0))

    @torch.no_grad()
    def logged_click(self, batch: RequestBatch) -> torch.Tensor:
        """(B, M) each logged item's probability of being pointed at first (the most engaging
        item), Seq2Slate's nearest thing to a click probability."""
        items, keys, state = self.encode(batch)
        start, _ = self.decoder(self.go.expand(len(items), 1, items.shape[-1]), state)
        first = self.point(keys, start, ~batch.cand_mask[:, None])[:, 0].exp()  # (B, n)
        return first.gather(1, logged_index(batch)) * batch.exposed_mask


class Seq2SlateSystem(BaselineSystem, section="seq2slate", model_class=Seq2Slate):
    """Seq2Slate behind the `system.System` interface (registered as "seq2slate")."""

    def graphs(self):
        """None: the encoder reads each request's candidates as a packed sequence of its own
        length (`pack_padded_sequence`), which the ONNX exporter cannot trace with a dynamic
        candidate count."""
        raise Nar4recError("seq2slate cannot be exported to ONNX: its LSTM encoder packs each "
                           "request's candidates to their own length, which the exporter "
                           "cannot trace; serve the run with `nar4rec serve --run`")
