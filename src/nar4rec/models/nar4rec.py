"""NAR4Rec's generator (Ren et al., KDD '24, section 4.1) and its training losses (4.2, 4.3).

The model is a matching model: a candidates encoder (Transformer layers over the n candidates)
and a position encoder (Transformer layers over m learned position embeddings that, in every
layer, cross-attend to the candidates encoder's hidden states of the same layer, Fig. 2). The
probability of candidate i at position j is a softmax over candidates of x_i . t_j (eq. 12).

The loss terms are plain functions beside the model: `likelihood_loss` (eq. 13),
`unlikelihood_loss` (eq. 15), `contrastive_loss` (eqs. 18-19) and `generator_loss`, which
combines them as L_ul + omega * (L_item + L_position). Turning the probability matrix into
lists (contrastive decoding, eq. 16) is `nar4rec.decode`'s job.

Where the paper is silent the choice is an option of `NAR4RecConfig`; see its docstring.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nar4rec import decode
from nar4rec.data.batch import RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.models.evaluator import predicted_list_utility
from nar4rec.models.layers import (
    MLP,
    UPSTREAM_NORMS,
    attend,
    key_padding_bias,
    personalised_inputs,
)

USER_CONDITIONINGS = ("add", "token")
CROSS_ATTENTION_SOURCES = ("self_attention", "layer_output")
OBJECTIVES = ("unlikelihood", "likelihood")


@dataclass
class NAR4RecConfig:
    """Every knob of the NAR4Rec generator and of its training objective.

    Architecture (section 4.1; sizes are not given by the paper, Table 4's timings suggest a
    small model):
        list_length: m, the number of positions generated (6 on Kuaishou, 5 on Avito).
        d_model, layers, heads, ff_mult, dropout: hidden size d, number L of Transformer layers
            in each encoder, attention heads, FFN width d * ff_mult, dropout.
        embedding_dim: width of every categorical feature table (FeatureEmbedding).
        activation: the sigma of the FFN (eq. 10): "gelu", "relu" or "silu".
        norm_first: pre-LayerNorm Transformer layers (stable to train; the paper does not say);
            False gives the original post-LN layers of Vaswani et al.
        personalised: condition on the user's features (section 3.1's request holds them; the
            paper does not say how they enter the model).
        user_conditioning: "add" adds the user vector to every candidate and every position
            embedding before the first layer; "token" prepends it as one extra token to the
            candidates encoder (positions then see it through cross-attention).
        user_interaction: also add a learned projection of the element-wise product of the
            user and each candidate vector (a factorisation-machine style user-item term: a
            sum of vectors passed through the layers models user-item affinity poorly).
        use_upstream_score: give the ranking stage's score to the candidate embedding as a
            numeric input; upstream_norm: "request" (z-score within a request) or "none".
        cross_attention_source: what the position encoder's layer l cross-attends to. Fig. 2
            and section 4.1 say "the hidden representation from the self-attention blocks of
            both encoders": "self_attention" (default) takes the candidates encoder's layer-l
            state after its self-attention block; "layer_output" takes it after the FFN.
        scaled_scores: divide x_i . t_j by sqrt(d) (a re-parametrisation of eq. 12 that keeps
            the initial softmax from saturating; the final LayerNorm gains can undo it).

    Objective (sections 4.2-4.3; NOTES.md):
        objective: "unlikelihood" (eq. 15) or "likelihood" (the "vanilla training on all
            exposed sequences" of Table 6: eq. 13 on every logged list).
        tau: the utility threshold of eq. 15 (a list with R(u, Y) < tau is negative). None
            means "not resolved yet": `resolve_tau` sets it to the `tau_quantile` quantile of
            the training lists' utilities, so a checkpoint records the value used.
        tau_quantile: that quantile (default the median: half the logged lists negative).
        rho: margin of the contrastive losses (eqs. 18-19), in [-1, 1]; 0.5 as in Fig. 4.
        omega: weight of L_item + L_position (NOTES.md: eq. 20 has none, section 5.2.3 varies
            it); 0.01 as in Fig. 4.

    Beyond the paper (off by default):
        evaluator_lists: K > 0 also applies eq. 15 to K lists sampled from the generator's own
            probability matrix at every training step (temperature 1, no candidate twice),
            with R(u, Y) estimated by the trained evaluator and a threshold per request: the
            evaluator's estimate for the generator's greedy list (self-critical training,
            Rennie et al. 2017; a list that ties with it is left out). The logged lists teach
            what the logging policy showed and one bit of how it went; these teach which of
            the generator's own lists the evaluator prefers. 0: the paper's training on the
            logged lists only. Validation then scores each epoch by the evaluator's utility
            for the generator's greedy lists (reranker.generator_step).
        evaluator_weight: weight of that term next to L_ul on the logged lists.
        gumbel_weight: alpha > 0 adds consistency training (CONGRATS, Kuaishou, KDD '26,
            arXiv 2510.10127; its authors' write-up): each position's choice is relaxed by a
            Gumbel-softmax of the probability matrix, softmax((log P + g) / T) over the
            candidates, the relaxed list goes through the frozen trained evaluator as mixtures
            of its candidate vectors, and alpha * L_con pushes the generator towards lists the
            evaluator rates highly. CONGRATS adds L_con to its generation loss with weight
            0.5 (L_total = L_con + 0.5 L_gen); here L_ul keeps weight 1 and alpha weighs L_con.
        gumbel_temperature: T (CONGRATS: 0.3).
        gumbel_hard: straight-through: the forward pass sees the one-hot list that greedy
            decoding of the relaxed matrix gives (no candidate twice), the gradient flows
            through the soft weights (Jang et al. 2017); False feeds the soft mixtures (which
            the evaluator never saw in training).
        gumbel_objective: "log": L_con = -sum_t sum_b w_b log sigmoid(logit_{t, b}), CONGRATS's
            pseudo-label 1 for every behaviour, weighted by the utility weights; "utility":
            minus the evaluator's predicted utility sum_t sum_b w_b sigmoid(logit_{t, b}).
        gumbel_duplicate: mu, weight of sum_i relu(sum_t P'_{i, t} - 1)^2 on the relaxed
            matrix: a candidate's mass over the positions beyond one (CONGRATS does not
            de-duplicate; a relaxed list can otherwise place one item everywhere).
        preference_lists: K > 0 adds preference optimisation between the generator's own
            lists (the DPO loss of Rafailov et al. 2023 as GReF, Kuaishou, CIKM '25, arXiv
            2510.25220, applies it to reranking, with pairs ranked by our evaluator instead
            of GReF's reordered logged lists): per request, the greedy list and K sampled
            lists are judged by the frozen evaluator; the best Y_w and the worst Y_l form a
            pair when their judged utilities differ by more than preference_margin, and
            -log sigmoid(beta (log pi(Y_w) - log pi(Y_l))) is added with weight
            preference_weight, log pi(Y) = sum_t log P[y_t, t]. The reference policy is the
            uniform one (every list of m candidates equally likely, so it cancels): GReF's
            frozen pre-trained copy would need a second generator; L_ul on the logged lists
            stays as the anchor GReF found necessary.
        preference_beta, preference_weight, preference_margin: beta (GReF: 0.1), the term's
            weight, and the smallest judged-utility gap that makes a pair.
    """

    list_length: int = 6
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.0
    embedding_dim: int = 16
    activation: str = "gelu"
    norm_first: bool = True
    personalised: bool = True
    user_conditioning: str = "add"
    user_interaction: bool = False
    use_upstream_score: bool = True
    upstream_norm: str = "request"
    cross_attention_source: str = "self_attention"
    scaled_scores: bool = True
    objective: str = "unlikelihood"
    tau: float | None = None
    tau_quantile: float = 0.5
    rho: float = 0.5
    omega: float = 0.01
    evaluator_lists: int = 0
    evaluator_weight: float = 1.0
    gumbel_weight: float = 2.0
    gumbel_temperature: float = 0.3
    gumbel_hard: bool = True
    gumbel_objective: str = "utility"
    gumbel_duplicate: float = 1.0
    preference_lists: int = 0
    preference_beta: float = 0.1
    preference_weight: float = 1.0
    preference_margin: float = 0.0

    @property
    def needs_evaluator(self) -> bool:
        """Whether training judges the generator's lists by the trained evaluator."""
        return bool(self.evaluator_lists or self.gumbel_weight or self.preference_lists)

    def __post_init__(self) -> None:
        if isinstance(self.tau, str):           # `--set tau=...` on a field whose default is None
            self.tau = None if self.tau.lower() in ("", "none") else float(self.tau)
        problems = []
        if self.list_length < 1:
            problems.append(f"list_length must be >= 1, not {self.list_length}")
        if self.d_model % self.heads:
            problems.append(f"d_model ({self.d_model}) must be a multiple of heads "
                            f"({self.heads})")
        if self.layers < 1:
            problems.append(f"layers must be >= 1, not {self.layers}")
        choices = (("user_conditioning", USER_CONDITIONINGS), ("upstream_norm", UPSTREAM_NORMS),
                   ("cross_attention_source", CROSS_ATTENTION_SOURCES),
                   ("objective", OBJECTIVES))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        if not 0.0 <= self.tau_quantile <= 1.0:
            problems.append(f"tau_quantile must be in [0, 1], not {self.tau_quantile}")
        if not -1.0 <= self.rho <= 1.0:
            problems.append(f"rho must be in [-1, 1], not {self.rho}")
        if self.evaluator_lists < 0 or self.evaluator_weight < 0:
            problems.append("evaluator_lists and evaluator_weight must be >= 0, not "
                            f"{self.evaluator_lists} and {self.evaluator_weight}")
        if self.gumbel_weight < 0 or self.gumbel_temperature <= 0 or self.gumbel_duplicate < 0:
            problems.append("gumbel_weight and gumbel_duplicate must be >= 0 and "
                            f"gumbel_temperature > 0, not {self.gumbel_weight}, "
                            f"{self.gumbel_duplicate} and {self.gumbel_temperature}")
        if self.gumbel_objective not in GUMBEL_OBJECTIVES:
            problems.append(f"gumbel_objective must be one of {GUMBEL_OBJECTIVES}, not "
                            f"{self.gumbel_objective!r}")
        if (self.preference_lists < 0 or self.preference_beta <= 0
                or self.preference_weight < 0 or self.preference_margin < 0):
            problems.append("preference_lists, preference_weight and preference_margin must "
                            "be >= 0 and preference_beta > 0")
        if problems:
            raise ValueError("; ".join(problems))


GUMBEL_OBJECTIVES = ("log", "utility")


@dataclass
class GeneratorOutput:
    """What NAR4Rec computes for a batch of B requests with n (padded) candidates.

    logits: (B, n, m) x_i . t_j, the most negative float on padded candidates.
    probs: (B, n, m) eq. 12, each column a distribution over the real candidates (padding 0).
    item_repr: (B, n, d) the candidates encoder's output x_i (zero on padding).
    position_repr: (B, m, d) the position encoder's output t_j.
    cand_mask: (B, n) True for real candidates.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    item_repr: torch.Tensor
    position_repr: torch.Tensor
    cand_mask: torch.Tensor


class CandidateLayer(nn.Module):
    """One candidates-encoder layer: bidirectional self-attention (eqs. 7-9), then FFN (eq. 10).

    `forward` returns the state after the self-attention block (what the position encoder's
    cross-attention reads, Fig. 2) and the layer's output.
    """

    def __init__(self, config: NAR4RecConfig):
        super().__init__()
        d = config.d_model
        self.norm_first = config.norm_first
        self.attention = nn.MultiheadAttention(d, config.heads, dropout=config.dropout,
                                               batch_first=True)
        self.ffn = MLP(d, [d * config.ff_mult], d, dropout=config.dropout,
                       activation=config.activation)
        self.attention_norm = nn.LayerNorm(d)
        self.ffn_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, n, d), padding (B, n) -inf where padded, else 0 (`key_padding_bias`) ->
        (attended, output), both (B, n, d)."""
        if self.norm_first:
            h = self.attention_norm(x)
            attended = x + self.dropout(attend(self.attention, h, h, padding))
            output = attended + self.dropout(self.ffn(self.ffn_norm(attended)))
        else:
            attended = self.attention_norm(x + self.dropout(attend(self.attention, x, x,
                                                                   padding)))
            output = self.ffn_norm(attended + self.dropout(self.ffn(attended)))
        return attended, output


class PositionLayer(nn.Module):
    """One position-encoder layer: self-attention among positions, cross-attention from
    positions to the candidates (eq. 11), then FFN (section 4.1, Fig. 2)."""

    def __init__(self, config: NAR4RecConfig):
        super().__init__()
        d = config.d_model
        self.norm_first = config.norm_first
        self.self_attention = nn.MultiheadAttention(d, config.heads, dropout=config.dropout,
                                                    batch_first=True)
        self.cross_attention = nn.MultiheadAttention(d, config.heads, dropout=config.dropout,
                                                     batch_first=True)
        self.ffn = MLP(d, [d * config.ff_mult], d, dropout=config.dropout,
                       activation=config.activation)
        self.self_norm = nn.LayerNorm(d)
        self.cross_norm = nn.LayerNorm(d)
        self.memory_norm = nn.LayerNorm(d) if config.norm_first else nn.Identity()
        self.ffn_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, t: torch.Tensor, memory: torch.Tensor, memory_padding: torch.Tensor
                ) -> torch.Tensor:
        """t (B, m, d), memory (B, n, d), memory_padding (B, n) -inf where padded, else 0 ->
        (B, m, d).

        Q = T W^Q, K = X W^K, V = X W^V (eq. 11) with X = `memory`, the candidates encoder's
        state at the same layer.
        """
        if self.norm_first:
            h = self.self_norm(t)
            t = t + self.dropout(attend(self.self_attention, h, h))
            keys = self.memory_norm(memory)
            t = t + self.dropout(attend(self.cross_attention, self.cross_norm(t), keys,
                                        memory_padding))
            return t + self.dropout(self.ffn(self.ffn_norm(t)))
        t = self.self_norm(t + self.dropout(attend(self.self_attention, t, t)))
        t = self.cross_norm(t + self.dropout(attend(self.cross_attention, t, memory,
                                                    memory_padding)))
        return self.ffn_norm(t + self.dropout(self.ffn(t)))


class NAR4Rec(nn.Module):
    """The non-autoregressive generator: candidates encoder, position encoder, probability
    matrix (section 4.1, Fig. 2).

    Args:
        config: the architecture (the objective fields are read by `generator_loss`).
        space: the feature space whose vocabularies size the embedding tables.
    """

    def __init__(self, config: NAR4RecConfig, space: FeatureSpace):
        super().__init__()
        self.config = config
        d = config.d_model
        self.candidates, self.user, self.interaction = personalised_inputs(config, space)
        self.positions = nn.Embedding(config.list_length, d)   # T, shared across requests
        nn.init.normal_(self.positions.weight, std=0.1)
        self.candidate_layers = nn.ModuleList(CandidateLayer(config)
                                              for _ in range(config.layers))
        self.position_layers = nn.ModuleList(PositionLayer(config)
                                             for _ in range(config.layers))
        self.candidate_norm = nn.LayerNorm(d) if config.norm_first else nn.Identity()
        self.position_norm = nn.LayerNorm(d) if config.norm_first else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)
        self.score_scale = 1.0 / math.sqrt(d) if config.scaled_scores else 1.0

    def forward(self, batch: RequestBatch) -> GeneratorOutput:
        """The probability matrix and representations of a batch of requests."""
        config = self.config
        cand_mask = batch.cand_mask                                    # (B, n)
        x = self.candidates(batch)                                     # (B, n, d)
        batch_size = x.shape[0]
        t = self.positions.weight.unsqueeze(0).expand(batch_size, -1, -1)  # (B, m, d)
        padding = ~cand_mask                                           # (B, n)
        if self.user is not None:
            user = self.user(batch)                                    # (B, d)
            if self.interaction is not None:
                x = x + self.interaction(user.unsqueeze(1) * x)        # (B, n, d)
            if config.user_conditioning == "add":
                x = x + user.unsqueeze(1)                              # (B, n, d)
                t = t + user.unsqueeze(1)                              # (B, m, d)
            else:
                x = torch.cat([user.unsqueeze(1), x], dim=1)           # (B, 1 + n, d)
                padding = torch.cat([padding.new_zeros(batch_size, 1), padding], dim=1)
        t = self.dropout(t)
        # An additive float mask (-inf on padding): `attend` passes it to PyTorch's fused
        # attention kernel (a boolean key-padding mask takes a slower masked-softmax path).
        padding = key_padding_bias(padding, x.dtype)                  # (B, n) 0 or -inf
        for candidate_layer, position_layer in zip(self.candidate_layers, self.position_layers,
                                                   strict=True):
            attended, x = candidate_layer(x, padding)                  # (B, n, d) each
            memory = attended if config.cross_attention_source == "self_attention" else x
            t = position_layer(t, memory, padding)                     # (B, m, d)
        x = self.candidate_norm(x)
        if self.user is not None and config.user_conditioning == "token":
            x = x[:, 1:]                                               # (B, n, d)
        x = x.masked_fill(~cand_mask.unsqueeze(-1), 0.0)
        t = self.position_norm(t)
        logits = x @ t.transpose(1, 2) * self.score_scale              # (B, n, m)
        logits = logits.masked_fill(~cand_mask.unsqueeze(-1), torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=1)                           # (B, n, m), eq. 12
        return GeneratorOutput(logits=logits, probs=probs, item_repr=x, position_repr=t,
                               cand_mask=cand_mask)


# ---------------------------------------------------------------------------------------------
# Losses


@dataclass
class GeneratorLoss:
    """The terms of eq. 20 with NOTES.md's weight: total = sequence + omega * (item + position).

    sequence: L_ul (eq. 15) or, with objective "likelihood", eq. 13 on every list.
    item, position: the contrastive margin losses over candidate and position representations.
    positive_fraction: () share of the batch's lists with R(u, Y) >= tau (1 for "likelihood").
    sampled, sampled_positive: the self-critical term on the generator's own lists and the
        share of them judged positive (0 without `evaluator_lists`).
    consistency, relaxed_utility: L_con of the Gumbel-softmax relaxation and the evaluator's
        utility for the relaxed lists (0 without `gumbel_weight`).
    preference, preference_pairs: the DPO term and the share of requests with a pair (0
        without `preference_lists`).
    """

    total: torch.Tensor
    sequence: torch.Tensor
    item: torch.Tensor
    position: torch.Tensor
    positive_fraction: torch.Tensor
    sampled: torch.Tensor
    sampled_positive: torch.Tensor
    consistency: torch.Tensor
    relaxed_utility: torch.Tensor
    preference: torch.Tensor
    preference_pairs: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        """Plain floats for logging."""
        return {name: float(getattr(self, name).detach()) for name in
                ("total", "sequence", "item", "position", "positive_fraction", "sampled",
                 "sampled_positive", "consistency", "relaxed_utility", "preference",
                 "preference_pairs")}


def exposed_log_probs(out: GeneratorOutput, exposed: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p and log(1 - p) of the exposed candidate at each position: `list_log_probs` of
    one list per request, exposed (B, M) -> (B, M) each."""
    log_p, log_not_p = list_log_probs(out, exposed.unsqueeze(1))
    return log_p.squeeze(1), log_not_p.squeeze(1)


def list_log_probs(out: GeneratorOutput, lists: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p and log(1 - p) of each list's candidate at each position, from the logits.

    log(1 - p_ij) = logsumexp_{k != i} l_kj - logsumexp_k l_kj, which stays finite and has
    useful gradients as p -> 1 (unlike log(1 - softmax)).

    Args:
        out: the generator's output; its m must be >= M.
        lists: (B, L, M) candidate index at each position of L lists per request (any value
            where padded).
    Returns:
        log_p, log_not_p: (B, L, M) each.
    """
    m, count, width = out.logits.shape[2], lists.shape[1], lists.shape[2]
    if width > m:
        raise ValueError(f"lists have {width} positions, the model generates {m}")
    scores = out.logits[:, :, :width].transpose(1, 2)                  # (B, M, n)
    log_norm = torch.logsumexp(scores, dim=-1).unsqueeze(1)            # (B, 1, M)
    scores = scores.unsqueeze(1).expand(-1, count, -1, -1)             # (B, L, M, n)
    index = lists.clamp(0, scores.shape[3] - 1).unsqueeze(-1)          # (B, L, M, 1)
    log_p = scores.gather(-1, index).squeeze(-1) - log_norm            # (B, L, M)
    others = scores.scatter(-1, index, torch.finfo(scores.dtype).min)  # (B, L, M, n)
    log_not_p = torch.logsumexp(others, dim=-1) - log_norm             # (B, L, M)
    return log_p, log_not_p


def likelihood_loss(out: GeneratorOutput, exposed: torch.Tensor,
                    exposed_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 13: -sum_j log p(exposed candidate at position j), averaged over the B lists.

    Args:
        out: the generator's output.
        exposed: (B, M) candidate index at each position.
        exposed_mask: (B, M) True for real positions.
    """
    log_p, _ = exposed_log_probs(out, exposed)                         # (B, M)
    return -(log_p * exposed_mask).sum() / max(exposed.shape[0], 1)


def unlikelihood_loss(out: GeneratorOutput, exposed: torch.Tensor, exposed_mask: torch.Tensor,
                      utility: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 15: lists with R(u, Y) < tau get -sum_j log(1 - p), the others -sum_j log p.

    Averaged over the B lists. A position whose request has a single real candidate cannot
    be made less likely (p = 1) and is left out of the negative term.

    Args:
        out: the generator's output.
        exposed: (B, M) candidate index at each position.
        exposed_mask: (B, M) True for real positions.
        utility: (B,) R(u, Y) of each logged list (`utility_of_feedback`).
        tau: the threshold.
    """
    log_p, log_not_p = exposed_log_probs(out, exposed)                 # (B, M) each
    return _unlikelihood(out, log_p, log_not_p, exposed_mask, (utility < tau).unsqueeze(1))


def _unlikelihood(out: GeneratorOutput, log_p: torch.Tensor, log_not_p: torch.Tensor,
                  mask: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Eq. 15 from the log probabilities (B, ..., M) of lists, their real positions `mask`
    and which lists are negative (broadcastable to them); summed, divided by B."""
    alternatives = out.cand_mask.sum(1) >= 2                           # (B,)
    alternatives = alternatives.view(-1, *([1] * (log_p.dim() - 1)))   # (B, 1, ...)
    valid = mask & (~negative | alternatives)                          # (B, ..., M)
    cell = torch.where(negative, -log_not_p, -log_p)                   # (B, ..., M)
    return torch.where(valid, cell, torch.zeros_like(cell)).sum() / max(log_p.shape[0], 1)


@torch.no_grad()
def sample_lists(out: GeneratorOutput, count: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, count, m) lists drawn from the probability matrix (temperature 1, every
    candidate allowed, none twice), for `evaluator_lists`."""
    batch, n, m = out.probs.shape
    probs = out.probs.detach().repeat(count, 1, 1)                     # (count B, n, m)
    drawn = decode.top_k_sampling(probs, out.cand_mask.repeat(count, 1), k=max(n, 1),
                                  generator=generator)                 # (count B, m)
    return drawn.view(count, batch, m).transpose(0, 1)                 # (B, count, m)


@torch.no_grad()
def judged_utility(evaluator: nn.Module, batch: RequestBatch, lists: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """(B, L) the evaluator's utility for lists (B, L, m) (NO_ITEM positions add nothing)."""
    mask = lists >= 0
    return predicted_list_utility(evaluator(batch, lists, mask), weights, mask)


@torch.no_grad()
def greedy_judged_utility(out: GeneratorOutput, batch: RequestBatch, evaluator: nn.Module,
                          weights: torch.Tensor) -> torch.Tensor:
    """() the mean over requests of the evaluator's utility for the generator's greedy lists:
    the validation loss's measure (negated) when the generator trains on its own lists."""
    greedy = decode.greedy(out.probs, out.cand_mask)                   # (B, m)
    return judged_utility(evaluator, batch, greedy.unsqueeze(1), weights).mean()


def self_critical_loss(out: GeneratorOutput, batch: RequestBatch, evaluator: nn.Module,
                       weights: torch.Tensor, count: int,
                       generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 15 on `count` lists sampled from the generator, judged by the evaluator.

    A sampled list is positive when the evaluator's utility for it is above its utility for
    the generator's greedy list of the same request, negative when below; a list that ties
    (usually the greedy list itself, drawn again) is left out (`NAR4RecConfig.evaluator_lists`).

    Returns:
        the loss, and the share of positive sampled lists.
    """
    sampled = sample_lists(out, count, generator)                      # (B, L, m)
    with torch.no_grad():
        greedy = decode.greedy(out.probs.detach(), out.cand_mask)      # (B, m)
        lists = torch.cat([greedy.unsqueeze(1), sampled], dim=1)       # (B, 1 + L, m)
        utility = judged_utility(evaluator, batch, lists, weights)     # (B, 1 + L)
        negative = utility[:, 1:] < utility[:, :1]                     # (B, L)
        positive = utility[:, 1:] > utility[:, :1]                     # (B, L)
    log_p, log_not_p = list_log_probs(out, sampled)                    # (B, L, m) each
    judged = (sampled >= 0) & (positive | negative).unsqueeze(-1)      # a tie teaches nothing
    loss = _unlikelihood(out, log_p, log_not_p, judged, negative.unsqueeze(-1))
    return loss / count, positive.float().mean()


def consistency_loss(out: GeneratorOutput, batch: RequestBatch, evaluator: nn.Module,
                     weights: torch.Tensor, config: NAR4RecConfig,
                     generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """L_con of CONGRATS's consistency training on a Gumbel-softmax relaxation of the matrix.

    P' = softmax((log P + g) / T) over each position's candidates, g ~ Gumbel(0, 1) (log P
    and the logits differ by a per-position constant, which the softmax ignores). The hard
    list is greedy decoding of P' (no candidate twice); with `gumbel_hard` the evaluator sees
    its one-hot rows and the gradient flows through P' (straight-through). The frozen
    evaluator scores the list (`Evaluator.forward_relaxed`) and L_con is
    -sum_t sum_b w_b log sigmoid(logit_{t, b}) ("log") or minus the predicted utility
    ("utility"), summed over positions, averaged over requests; plus gumbel_duplicate times
    sum_i relu(sum_t P'_{i, t} - 1)^2.

    Returns:
        the loss, and the evaluator's mean utility for the relaxed lists (for logging).
    """
    logits = out.logits.float()                                        # (B, n, m)
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))  # (B, n, m)
    relaxed = torch.softmax((logits + gumbel) / config.gumbel_temperature, dim=1)
    relaxed = relaxed * out.cand_mask.unsqueeze(-1)                    # (B, n, m)
    lists = decode.greedy(relaxed.detach(), out.cand_mask)             # (B, m)
    placed = lists >= 0                                                # (B, m)
    choice = relaxed
    if config.gumbel_hard:
        one_hot = F.one_hot(lists.clamp_min(0), logits.shape[1]).transpose(1, 2).to(relaxed)
        one_hot = one_hot * placed.unsqueeze(1)                        # (B, n, m)
        choice = one_hot + relaxed - relaxed.detach()
    judged = evaluator.forward_relaxed(batch, choice, lists)          # (B, m, K)
    weights = weights.to(judged)
    utility = (torch.sigmoid(judged) @ weights) * placed               # (B, m)
    if config.gumbel_objective == "log":
        per_position = -(F.logsigmoid(judged) @ weights)               # (B, m)
    else:
        per_position = -(torch.sigmoid(judged) @ weights)
    loss = (per_position * placed).sum(1).mean()
    excess = torch.relu(relaxed.sum(2) - 1.0)                          # (B, n)
    loss = loss + config.gumbel_duplicate * excess.pow(2).sum(1).mean()
    return loss, utility.sum(1).mean().detach()


def preference_loss(out: GeneratorOutput, batch: RequestBatch, evaluator: nn.Module,
                    weights: torch.Tensor, config: NAR4RecConfig,
                    generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO between the generator's own lists ranked by the frozen evaluator
    (`NAR4RecConfig.preference_lists`): -log sigmoid(beta (log pi(Y_w) - log pi(Y_l))), the
    reference policy uniform, averaged over the requests that have a pair.

    Returns:
        the loss, and the share of requests with a pair.
    """
    sampled = sample_lists(out, config.preference_lists, generator)    # (B, L, m)
    with torch.no_grad():
        greedy = decode.greedy(out.probs.detach(), out.cand_mask)      # (B, m)
        lists = torch.cat([greedy.unsqueeze(1), sampled], dim=1)       # (B, 1 + L, m)
        utility = judged_utility(evaluator, batch, lists, weights)     # (B, 1 + L)
        best, worst = utility.argmax(1), utility.argmin(1)             # (B,)
        gap = utility.gather(1, best[:, None]) - utility.gather(1, worst[:, None])
        paired = gap[:, 0] > config.preference_margin                  # (B,)
    rows = torch.arange(len(lists), device=lists.device)
    chosen = torch.stack([lists[rows, best], lists[rows, worst]], dim=1)  # (B, 2, m)
    log_p, _ = list_log_probs(out, chosen)                             # (B, 2, m)
    log_pi = (log_p * (chosen >= 0)).sum(-1)                           # (B, 2)
    margin = config.preference_beta * (log_pi[:, 0] - log_pi[:, 1])    # (B,)
    loss = -(F.logsigmoid(margin) * paired).sum() / paired.sum().clamp(min=1)
    return loss, paired.float().mean()


def contrastive_loss(representation: torch.Tensor, mask: torch.Tensor | None,
                     rho: float) -> torch.Tensor:
    """Eqs. 18-19: mean over pairs i != j of max(0, rho - s(h_i, h_i) + s(h_i, h_j)).

    s is the cosine similarity, so s(h_i, h_i) = 1 (the paper's footnote 1). The mean is taken
    over each request's real pairs (1 / (n (n - 1))), then over requests that have a pair.

    Args:
        representation: (B, L, d) candidate (L = n) or position (L = m) representations.
        mask: (B, L) True for real entries, or None when all are real.
        rho: the margin, in [-1, 1].
    """
    batch_size, length, _ = representation.shape
    unit = F.normalize(representation, dim=-1, eps=1e-8)               # (B, L, d)
    similarity = unit @ unit.transpose(1, 2)                           # (B, L, L)
    if mask is None:
        mask = torch.ones(batch_size, length, dtype=torch.bool, device=representation.device)
    distinct = ~torch.eye(length, dtype=torch.bool, device=representation.device)
    pairs = mask.unsqueeze(2) & mask.unsqueeze(1) & distinct           # (B, L, L)
    hinge = torch.relu(rho - 1.0 + similarity) * pairs                 # (B, L, L)
    count = pairs.sum((1, 2))                                          # (B,)
    per_request = hinge.sum((1, 2)) / count.clamp(min=1)               # (B,)
    has_pairs = count > 0
    if not has_pairs.any():
        return representation.sum() * 0.0
    return per_request[has_pairs].mean()


def utility_of_feedback(feedback: torch.Tensor, weights: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """R(u, Y) of section 3.1: sum over positions and behaviours of w_b * e_{u, y_i, b}.

    Args:
        feedback: (B, M, K) behaviour values at each exposed position.
        weights: (K,) utility weight of each behaviour.
        mask: (B, M) True for real positions.
    Returns:
        (B,) the utility of each list.
    """
    item_utility = feedback @ weights.to(feedback)                     # (B, M)
    return (item_utility * mask).sum(1)                                # (B,)


def utility_threshold(batches: Iterable[RequestBatch], weights: torch.Tensor, quantile: float,
                      *, max_requests: int | None = None) -> float:
    """The `quantile` quantile of the logged lists' utilities R(u, Y), e.g. over a training
    loader; `max_requests` stops early on a large file."""
    utilities: list[np.ndarray] = []
    seen = 0
    for batch in batches:
        utility = utility_of_feedback(batch.feedback, weights, batch.exposed_mask)
        utilities.append(utility.numpy(force=True).astype(np.float64))
        seen += len(utility)
        if max_requests is not None and seen >= max_requests:
            break
    if not utilities:
        raise ValueError("no requests to compute a utility threshold from")
    values = np.concatenate(utilities)[:max_requests]
    return float(np.quantile(values, quantile))


def resolve_tau(config: NAR4RecConfig, loader: RequestLoader, *,
                max_requests: int | None = None) -> NAR4RecConfig:
    """`config` with tau set from the loader's utilities when it is None (section 4.2).

    Args:
        config: the generator's config; returned unchanged when tau is already set or the
            objective does not use it.
        loader: a RequestLoader over the training files (its FeatureSpace gives the weights).
    """
    if config.tau is not None or config.objective != "unlikelihood":
        return config
    tau = utility_threshold(loader, loader.space.utility_weights, config.tau_quantile,
                            max_requests=max_requests)
    return dataclasses.replace(config, tau=tau)


def generator_loss(out: GeneratorOutput, batch: RequestBatch, config: NAR4RecConfig,
                   weights: torch.Tensor, evaluator: nn.Module | None = None,
                   generator: torch.Generator | None = None) -> GeneratorLoss:
    """Eq. 20 with the weight omega: L_seq + omega * (L_item + L_position).

    L_seq is L_ul (eq. 15) with the threshold `config.tau`, or with objective "likelihood"
    the likelihood (eq. 13) of every logged list. L_item is the margin loss over the candidate
    representations, L_position over the position representations (eqs. 18-19, NOTES.md).

    Args:
        out: the generator's output for `batch`.
        batch: the requests, with their logged lists and feedback.
        config: reads objective, tau, rho, omega and the evaluator-judged terms
            (evaluator_lists, gumbel_*, preference_*).
        weights: (K,) utility weight of each behaviour (`FeatureSpace.utility_weights`).
        evaluator: the trained evaluator, needed when `config.needs_evaluator`.
        generator: random numbers for the sampled lists (None: the global generator).
    """
    if config.objective == "unlikelihood":
        if config.tau is None:
            raise ValueError("tau is not set: call resolve_tau(config, train_loader) first, "
                             "or give tau a value")
        utility = utility_of_feedback(batch.feedback, weights, batch.exposed_mask)  # (B,)
        sequence = unlikelihood_loss(out, batch.exposed, batch.exposed_mask, utility,
                                     config.tau)
        positive_fraction = (utility >= config.tau).float().mean()
    else:
        sequence = likelihood_loss(out, batch.exposed, batch.exposed_mask)
        positive_fraction = torch.ones((), device=sequence.device)
    zero = torch.zeros((), device=sequence.device)
    sampled = sampled_positive = consistency = relaxed_utility = preference = pairs = zero
    if config.needs_evaluator and evaluator is None:
        raise ValueError("evaluator_lists, gumbel_weight and preference_lists need the trained "
                         "evaluator")
    if config.evaluator_lists:
        sampled, sampled_positive = self_critical_loss(out, batch, evaluator, weights,
                                                       config.evaluator_lists, generator)
    if config.gumbel_weight:
        consistency, relaxed_utility = consistency_loss(out, batch, evaluator, weights, config,
                                                        generator)
    if config.preference_lists:
        preference, pairs = preference_loss(out, batch, evaluator, weights, config, generator)
    item = contrastive_loss(out.item_repr, out.cand_mask, config.rho)
    position = contrastive_loss(out.position_repr, None, config.rho)
    total = (sequence + config.evaluator_weight * sampled + config.gumbel_weight * consistency
             + config.preference_weight * preference + config.omega * (item + position))
    return GeneratorLoss(total=total, sequence=sequence, item=item, position=position,
                         positive_fraction=positive_fraction, sampled=sampled,
                         sampled_positive=sampled_positive, consistency=consistency,
                         relaxed_utility=relaxed_utility, preference=preference,
                         preference_pairs=pairs)
