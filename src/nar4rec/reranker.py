"""The generator-evaluator pipeline of section 4.4: the generator proposes, the evaluator picks.

`Reranker.rerank(batch)` is the one call a user makes. The generator runs once per batch; its
probability matrix is decoded into K candidate lists per request (contrastive decoding at
several alphas, which includes greedy at alpha = 0, and top-k sampled lists); the evaluator
scores all K lists of all requests in one forward pass and the best list of each request is
returned with its predicted utility and its items' predicted utilities. Nothing loops over
requests.

The paper does not say how many lists are proposed nor how they differ (NOTES.md): both are
options of `RerankerConfig`. A run that holds only an evaluator reranks by the evaluator's
item-wise scores (`evaluator_top_m`), the "rank by a point-wise model" strategy.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from nar4rec import decode
from nar4rec.config import paper_config
from nar4rec.data.batch import RequestBatch
from nar4rec.data.loader import RequestLoader
from nar4rec.decode import NO_ITEM
from nar4rec.models.base import Ranking, predicted_utility, top_m
from nar4rec.models.evaluator import Evaluator, EvaluatorConfig, evaluator_loss
from nar4rec.models.nar4rec import (
    GeneratorOutput,
    NAR4Rec,
    generator_loss,
    greedy_judged_utility,
    resolve_tau,
)
from nar4rec.system import Companion, Phase, Reranked, System

SELECTIONS = ("evaluator", "first")


@dataclass
class RerankerConfig:
    """How the generator's lists are proposed and chosen.

    alphas: the contrastive-decoding weights (eq. 16) of the decoded proposals; 0 is greedy.
    contrastive_k: the candidate set V(k) of every contrastive decoding (SimCTG's contrastive
        search, `decode.contrastive`): the argmax of eq. 16 ranges over the k most probable
        unplaced candidates. 0: over all of them, the literal reading of eq. 16.
    contrastive_alpha: the weight of the generator-alone contrastive decoding (the paper's
        Table 7 row, `RerankerSystem`'s "generator_contrastive").
    evaluator_alphas: more contrastive-decoded proposals, one per weight, whose similarity
        is the evaluator's learned redundancy (`Evaluator.candidate_similarity`) instead of
        the generator's representations; needs an evaluator with `similarity_heads` or
        `shared_values`. Empty: none.
    samples: how many top-k sampled lists are proposed besides (0: none).
    evaluator_top_m: also propose the evaluator's item-wise top m (each candidate scored
        alone, the m best), last; the evaluator then keeps it only where it rates it above
        every generated list. PIER's permutation set holds its point-wise top m likewise.
    sample_k, temperature: the top-k sampler's k and temperature.
    similarity: the contrastive penalty's similarity, "cosine" (the paper) or "dot".
    select: "evaluator" scores every proposal and keeps the best; "first" returns the first
        proposal (the first alpha) without asking the evaluator.
    seed: the sampler's seed; the same batch gives the same lists.
    """

    alphas: tuple[float, ...] = (0.0,)
    contrastive_k: int = decode.CONTRASTIVE_K
    contrastive_alpha: float = decode.CONTRASTIVE_ALPHA
    evaluator_alphas: tuple[float, ...] = (0.02, 0.1)
    samples: int = 0
    evaluator_top_m: bool = True
    sample_k: int = 5
    temperature: float = 1.0
    similarity: str = "cosine"
    select: str = "evaluator"
    seed: int = 0

    def __post_init__(self) -> None:
        self.alphas = tuple(float(a) for a in self.alphas)
        self.evaluator_alphas = tuple(float(a) for a in self.evaluator_alphas)
        problems = []
        if not self.alphas:
            problems.append("alphas must hold at least one value")
        for name in ("alphas", "evaluator_alphas"):
            if any(not 0.0 <= a <= 1.0 for a in getattr(self, name)):
                problems.append(f"{name} must lie in [0, 1], not {list(getattr(self, name))}")
        if self.contrastive_k < 0:
            problems.append(f"contrastive_k must be >= 0 (0: every candidate), not "
                            f"{self.contrastive_k}")
        if not 0.0 <= self.contrastive_alpha <= 1.0:
            problems.append(f"contrastive_alpha must lie in [0, 1], not "
                            f"{self.contrastive_alpha}")
        if self.samples < 0:
            problems.append(f"samples must be >= 0, not {self.samples}")
        if self.sample_k < 1:
            problems.append(f"sample_k must be >= 1, not {self.sample_k}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, not {self.temperature}")
        if self.similarity not in decode.SIMILARITIES:
            problems.append(f"similarity must be one of {decode.SIMILARITIES}, "
                            f"not {self.similarity!r}")
        if self.select not in SELECTIONS:
            problems.append(f"select must be one of {SELECTIONS}, not {self.select!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def candidate_set(self) -> int | None:
        """`contrastive_k` as `decode.contrastive`'s k: None for every candidate."""
        return self.contrastive_k or None

    @property
    def proposals(self) -> int:
        """K, the number of lists proposed per request."""
        return (len(self.alphas) + len(self.evaluator_alphas) + self.samples
                + int(self.evaluator_top_m))


class Reranker:
    """A trained generator and/or evaluator behind one `rerank(batch)` call.

    Args:
        generator: the NAR4Rec generator, or None for an evaluator-only reranker.
        evaluator: the sequence evaluator, or None to return the first proposal.
        weights: (K,) utility weight of each behaviour (`FeatureSpace.utility_weights`).
        config: how lists are proposed and chosen.
        list_length: m, the length of the lists returned when there is no generator.
    """

    def __init__(self, generator: NAR4Rec | None, evaluator: Evaluator | None,
                 weights: torch.Tensor, config: RerankerConfig | None = None, *,
                 list_length: int | None = None):
        if generator is None and evaluator is None:
            raise ValueError("a Reranker needs a generator, an evaluator, or both")
        self.generator = generator.eval() if generator is not None else None
        self.evaluator = evaluator.eval() if evaluator is not None else None
        self.weights = weights.float()
        self.config = config or RerankerConfig()
        if list_length is None:
            list_length = (generator or evaluator).config.list_length
        self.list_length = list_length
        if generator is not None and self.config.evaluator_alphas and (
                evaluator is None or evaluator.redundancy is None):
            raise ValueError("reranker.evaluator_alphas needs an evaluator trained with "
                             "evaluator.similarity_heads > 0 or evaluator.shared_values")
        if generator is not None and self.config.evaluator_top_m and evaluator is None:
            raise ValueError("reranker.evaluator_top_m needs an evaluator")

    def to(self, device: torch.device | str) -> Reranker:
        """Moves the generator, the evaluator and the weights to `device`; returns self."""
        for model in (self.generator, self.evaluator):
            if model is not None:
                model.to(device)
        self.weights = self.weights.to(device)
        return self

    @torch.no_grad()
    def rerank(self, batch: RequestBatch) -> Reranked:
        """The best list of each request of the batch."""
        if self.generator is None:
            return self.evaluator_top_m(batch)
        return self.choose(batch, self.generator(batch))

    @torch.no_grad()
    def choose(self, batch: RequestBatch, out: GeneratorOutput) -> Reranked:
        """`rerank` from the generator's output for the batch, already computed."""
        proposals = self.proposals(batch, out)                         # (B, K, m)
        if self.evaluator is None or self.config.select == "first":
            lists = proposals[:, 0]
            placed = out.probs.gather(1, lists.clamp_min(0).unsqueeze(1)).squeeze(1)  # (B, m)
            utility = torch.full((len(lists),), torch.nan, device=lists.device)
            return Reranked(lists, utility, placed.masked_fill(lists < 0, 0.0), proposals,
                            torch.zeros(len(lists), dtype=torch.long, device=lists.device))
        lists, utility, item_scores, chosen = best_of(proposals,
                                                      self.item_utility(batch, proposals))
        return Reranked(lists, utility, item_scores, proposals, chosen)

    @torch.no_grad()
    def propose(self, batch: RequestBatch) -> torch.Tensor:
        """(B, K, m) the K proposals: one per alpha, one per evaluator alpha, the sampled
        ones, then the evaluator's item-wise top m when asked for."""
        return self.proposals(batch, self.generator(batch))

    @torch.no_grad()
    def proposals(self, batch: RequestBatch, out: GeneratorOutput) -> torch.Tensor:
        """`propose` from the generator's output for the batch, already computed."""
        return proposals_of(out, batch, self.evaluator, self.weights, self.config)

    @torch.no_grad()
    def item_utility(self, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
        """(B, L, m) the evaluator's predicted utility of each item of lists (B, L, m); 0 on
        NO_ITEM positions."""
        mask = lists >= 0
        logits = self.evaluator(batch, lists, mask)                    # (B, L, m, K)
        return predicted_utility(logits, self.weights) * mask

    @torch.no_grad()
    def evaluator_top_m(self, batch: RequestBatch) -> Reranked:
        """The top m candidates by the evaluator's item-wise score.

        Each candidate is scored alone, as a one-item list at the first position (no list
        context), and the m best are shown in that order: the point-wise strategy that the
        evaluator's list awareness is meant to beat.
        """
        scores = self.item_wise_scores(batch)                                   # (B, n)
        lists = top_m(scores, batch.cand_mask, self.list_length)                # (B, m)
        item_scores = scores.gather(1, lists.clamp_min(0)).masked_fill(lists < 0, 0.0)
        utility = self.item_utility(batch, lists.unsqueeze(1)).sum(-1).squeeze(1)  # (B,)
        return Reranked(lists, utility, item_scores, lists.unsqueeze(1),
                        torch.zeros(len(lists), dtype=torch.long, device=lists.device))

    @torch.no_grad()
    def item_wise_scores(self, batch: RequestBatch) -> torch.Tensor:
        """(B, n) each candidate's predicted utility alone at the first position; -inf on
        padded candidates."""
        if self.evaluator is None:
            raise ValueError("item-wise scores need an evaluator")
        return item_wise_scores(self.evaluator, batch, self.weights)


def item_wise_scores(evaluator: Evaluator, batch: RequestBatch, weights: torch.Tensor
                     ) -> torch.Tensor:
    """(B, n) each candidate's utility predicted by `evaluator` for the candidate alone at
    the first position (behaviour `weights` (K,)); -inf on padded candidates."""
    n = batch.cand_mask.shape[1]
    single = torch.arange(n, device=batch.cand_mask.device).expand_as(batch.cand_mask)  # (B, n)
    lists = single.unsqueeze(-1)                                            # (B, n, 1)
    logits = evaluator(batch, lists, lists >= 0)                            # (B, n, 1, K)
    scores = predicted_utility(logits, weights).squeeze(-1)                 # (B, n)
    return scores.masked_fill(~batch.cand_mask, -torch.inf)


def proposals_of(out: GeneratorOutput, batch: RequestBatch, evaluator: Evaluator | None,
                 weights: torch.Tensor, config: RerankerConfig) -> torch.Tensor:
    """(B, K, m) every proposal of `config` from a generator output: the decoded ones
    (`propose`; evaluator alphas with the evaluator's pairwise similarity), then the
    evaluator's item-wise top m when asked for. `Reranker` and the exported pipeline graph
    both call it."""
    pairwise = evaluator.candidate_similarity(batch) if config.evaluator_alphas else None
    lists = propose(out.probs, out.item_repr, batch.cand_mask, config,
                    request_keys(batch.user_cat, batch.cand_cat, batch.cand_mask),
                    pairwise)                                          # (B, K', m)
    if config.evaluator_top_m:
        lists = with_item_wise_top_m(lists, evaluator, batch, weights)  # (B, K, m)
    return lists


def with_item_wise_top_m(proposals: torch.Tensor, evaluator: Evaluator, batch: RequestBatch,
                         weights: torch.Tensor) -> torch.Tensor:
    """(B, K, m) proposals -> (B, K + 1, m): the evaluator's item-wise top m appended."""
    top = top_m(item_wise_scores(evaluator, batch, weights), batch.cand_mask,
                proposals.shape[-1])                                           # (B, m)
    return torch.cat([proposals, top.unsqueeze(1)], dim=1)


def best_of(proposals: torch.Tensor, item_utility: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each request's proposal with the highest predicted utility.

    Args:
        proposals: (B, K, m) lists; item_utility: (B, K, m) predicted utility of each item.
    Returns:
        lists (B, m), utility (B,), item scores (B, m), chosen (B,) index of the proposal.
    """
    utility = item_utility.sum(-1)                                     # (B, K)
    chosen = utility.argmax(dim=1)                                     # (B,)
    rows = torch.arange(len(chosen), device=chosen.device)
    return (proposals[rows, chosen], utility[rows, chosen], item_utility[rows, chosen],
            chosen)


_PRIME = 2_147_483_647                          # 2^31 - 1: products stay inside int64


def request_keys(user_cat: torch.Tensor, cand_cat: torch.Tensor,
                 cand_mask: torch.Tensor) -> torch.Tensor:
    """(B,) an integer in [1, 2^31 - 1) per request from its user and candidate ids.

    The same request gets the same key in any batch, at any position: the seed of its own
    sampled proposals.
    """
    slot = torch.arange(1, cand_cat.shape[1] + 1, device=cand_cat.device)
    items = (cand_cat[..., 0] * cand_mask) % _PRIME                     # (B, n)
    mixed = (items * 7919 + slot * 104_729) % _PRIME * (items + 1) % _PRIME
    key = ((mixed * cand_mask).sum(dim=1) + user_cat[:, 0] * 1_000_003) % _PRIME  # padding
    # adds nothing: the key does not depend on how wide the batch is padded
    return key.clamp_min(1)


def request_uniforms(keys: torch.Tensor, seed: int, draws: int, length: int) -> torch.Tensor:
    """(B, draws, length) numbers in (0, 1): a Park-Miller stream per request key and seed.

    The k-th number of a stream is state * 48271^k mod (2^31 - 1), computed for every k at once
    (the multipliers are below 2^31, so each product fits in int64).
    """
    state = (keys * 48_271 + (seed % _PRIME) * 16_807 + 1) % _PRIME
    state = state.clamp_min(1)                                          # (B,)
    powers = _stream_multipliers(draws * length, keys.device)          # (draws * length,)
    stacked = (state[:, None] * powers % _PRIME).double() / _PRIME     # (B, draws * length)
    return stacked.view(len(keys), draws, length)


def _stream_multipliers(count: int, device: torch.device) -> torch.Tensor:
    """(count,) 48271^k mod (2^31 - 1) for k = 1..count on `device`, made once per count and
    device (no host-to-device copy per call, which a CUDA graph could not hold)."""
    return _constant(_multipliers(count), torch.long, device)


@functools.cache
def _multipliers(count: int) -> tuple[int, ...]:
    multipliers, value = [], 1
    for _ in range(count):
        value = value * 48_271 % _PRIME
        multipliers.append(value)
    return tuple(multipliers)


def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `values`, kept per device so that eager calls copy it there once. While a
    graph is traced (torch.compile, the ONNX export) it is made afresh: a traced tensor must
    not outlive its trace."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_constant(values, dtype, device)


@functools.cache            # never dropped: a captured CUDA graph may hold its memory
def _cached_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


@torch.no_grad()
def propose(probs: torch.Tensor, item_repr: torch.Tensor, cand_mask: torch.Tensor,
            config: RerankerConfig, keys: torch.Tensor | None = None,
            pairwise: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, m) the K proposals of `config` from a probability matrix (B, n, m), candidate
    representations (B, n, d) and candidate mask (B, n): one contrastive-decoded list per
    alpha, one per evaluator alpha (with the similarities `pairwise` (B, n, n)), then the
    top-k samples. With `keys` (B,) from `request_keys` each request's samples come from its
    own random stream (the same in any batch); without, from one generator seeded by
    `config.seed` for the whole batch."""
    batch, m = len(probs), probs.shape[2]
    # Every alpha in one decoding pass over stacked copies of the batch (copy a = alpha a),
    # and every sample in one pass: 2 loops over the m positions instead of K.
    alphas = _constant(config.alphas, probs.dtype, probs.device)
    copies = len(config.alphas)
    # (expand, not repeat_interleave: the ONNX exporter bakes the latter's batch size in)
    row_alpha = alphas[:, None].expand(copies, batch).reshape(-1)      # (A B,)
    decoded = decode.contrastive(
        probs.repeat(copies, 1, 1), item_repr.repeat(copies, 1, 1), cand_mask.repeat(copies, 1),
        alpha=row_alpha, k=config.candidate_set, similarity=config.similarity)  # (A B, m)
    lists = [decoded.view(copies, batch, m).transpose(0, 1)]           # (B, A, m)
    if config.evaluator_alphas:
        if pairwise is None:
            raise ValueError("reranker.evaluator_alphas needs the evaluator's pairwise "
                             "similarities")
        copies = len(config.evaluator_alphas)
        alphas = _constant(config.evaluator_alphas, probs.dtype, probs.device)
        decoded = decode.contrastive(
            probs.repeat(copies, 1, 1), None, cand_mask.repeat(copies, 1),
            alpha=alphas[:, None].expand(copies, batch).reshape(-1), k=config.candidate_set,
            pairwise=pairwise.repeat(copies, 1, 1))                    # (E B, m)
        lists.append(decoded.view(copies, batch, m).transpose(0, 1))   # (B, E, m)
    if config.samples:
        samples = config.samples
        if keys is not None:
            uniform = request_uniforms(keys, config.seed, samples, m).to(probs)  # (B, S, m)
            sampled = decode.top_k_sampling(
                probs.repeat(samples, 1, 1), cand_mask.repeat(samples, 1), k=config.sample_k,
                temperature=config.temperature,
                uniform=uniform.transpose(0, 1).reshape(samples * batch, m))   # (S B, m)
            lists.append(sampled.view(samples, batch, m).transpose(0, 1))  # (B, S, m)
        else:
            sampler = torch.Generator(device=probs.device).manual_seed(config.seed)
            lists += [decode.top_k_sampling(probs, cand_mask, k=config.sample_k,
                                            temperature=config.temperature,
                                            generator=sampler).unsqueeze(1)
                      for _ in range(samples)]
    return torch.cat(lists, dim=1)                                     # (B, K, m)


# ---------------------------------------------------------------------------------------------
# The systems of the registry: the evaluator alone, and NAR4Rec (evaluator, then generator)

TAU_REQUESTS = 200_000          # logged lists read to set tau from the training utilities


def evaluator_step(config: EvaluatorConfig):
    """The evaluator's LossFn for the training loop: per-behaviour BCE on the logged lists,
    plus, with `config.alone_weight`, the same BCE for every logged item scored alone (a
    one-item list at the first position, as `item_wise_scores` scores candidates), so that
    the evaluator's item-wise scores are trained, like a point-wise model's, on every shown
    item's feedback instead of read out of a context it never saw in training."""
    weight = config.alone_weight

    def step(network: torch.nn.Module, batch: RequestBatch
             ) -> tuple[torch.Tensor, dict[str, float]]:
        if not weight:
            loss = evaluator_loss(network(batch), batch.feedback, batch.exposed_mask)
            return loss, {"loss": float(loss.detach())}
        exposed, mask = batch.exposed, batch.exposed_mask                       # (B, M)
        # one forward pass over the logged list and its M one-item lists, padded to M
        alone = torch.full(exposed.shape + exposed.shape[-1:], NO_ITEM,
                           dtype=exposed.dtype, device=exposed.device)          # (B, M, M)
        alone[..., 0] = exposed
        alone_mask = torch.zeros_like(alone, dtype=torch.bool)
        alone_mask[..., 0] = mask                  # a padded position's list is all padding
        lists = torch.cat([exposed.unsqueeze(1), alone], dim=1)                 # (B, 1+M, M)
        lists_mask = torch.cat([mask.unsqueeze(1), alone_mask], dim=1)
        logits = network(batch, lists, lists_mask)                              # (B, 1+M, M, K)
        in_context = evaluator_loss(logits[:, 0], batch.feedback, mask)
        alone_loss = evaluator_loss(logits[:, 1:, 0], batch.feedback, mask)
        loss = in_context + weight * alone_loss
        return loss, {"loss": float(loss.detach()), "in_context": float(in_context.detach()),
                      "alone": float(alone_loss.detach())}
    return step


def generator_step(config, weights: torch.Tensor, evaluator: Evaluator | None = None):
    """The generator's LossFn for the training loop, with its objective settings (tau set)
    and, for the terms judged by it (`NAR4RecConfig.needs_evaluator`), the trained evaluator
    (frozen).

    With the evaluator, the validation loss is minus the evaluator's mean utility for the
    generator's greedy lists: what that training optimises (its loss on sampled lists is
    relative to the greedy list and does not compare epochs)."""
    if evaluator is not None:
        evaluator.requires_grad_(False)

    def step(network: torch.nn.Module, batch: RequestBatch
             ) -> tuple[torch.Tensor, dict[str, float]]:
        out = network(batch)
        if evaluator is not None and not network.training:
            judged = greedy_judged_utility(out, batch, evaluator, weights)
            return -judged, {"greedy_judged_utility": float(judged)}
        terms = generator_loss(out, batch, config, weights, evaluator)
        return terms.total, terms.as_dict()
    return step


class EvaluatorSystem(System):
    """NAR4Rec's evaluator alone: each candidate scored alone by it, the m best shown
    (`Reranker.evaluator_top_m`, the "rank by a point-wise model" strategy)."""

    phases = (Phase("evaluator", "evaluator", "evaluator_train"),)
    sections = ("evaluator", "evaluator_train", "features")
    lists_name = "evaluator_top_m"

    def __init__(self, modules, config, space, list_length):
        super().__init__(modules, config, space, list_length)
        self.reranker = Reranker(modules.get("generator"), modules["evaluator"], self.weights,
                                 config.reranker, list_length=list_length)

    @classmethod
    def build(cls, phase, model_config, space):
        if phase.name == "evaluator":
            return Evaluator(model_config, space)
        return NAR4Rec(model_config, space)

    @classmethod
    def loss(cls, phase, model_config, space, trained):
        return evaluator_step(model_config)

    def to(self, device) -> EvaluatorSystem:
        super().to(device)
        self.reranker.weights = self.weights
        return self

    @torch.no_grad()
    def rerank(self, batch: RequestBatch) -> Reranked:
        return self.reranker.evaluator_top_m(batch)

    @torch.no_grad()
    def evaluate(self, batch: RequestBatch, variants: bool = True
                 ) -> tuple[Ranking, dict[str, torch.Tensor]]:
        return Ranking(self.rerank(batch).lists, self.reranker.item_wise_scores(batch)), {}

    @torch.no_grad()
    def logged_click(self, batch: RequestBatch) -> torch.Tensor:
        return torch.sigmoid(self.modules["evaluator"](batch)[..., 0])      # (B, M)

    @torch.no_grad()
    def predict_feedback(self, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
        """The evaluator's behaviour probabilities of each item in the list's context."""
        real = lists >= 0                                                   # (B, m)
        logits = self.modules["evaluator"](batch, lists.unsqueeze(1), real.unsqueeze(1))
        return torch.sigmoid(logits[:, 0]) * real.unsqueeze(-1)            # (B, m, K)


class NAR4RecSystem(EvaluatorSystem):
    """NAR4Rec (section 4): the evaluator, then the generator; the generator proposes lists
    and the evaluator picks (`Reranker`).

    For the offline metrics a candidate's score and exposure probability are its row sum of
    the probability matrix, clipped to 1. `evaluate` also decodes the generator's matrix with
    every decoder of the paper's Table 7 and ranks by the evaluator's item-wise score, so the
    variants are measured on the same forward pass.
    """

    phases = (Phase("evaluator", "evaluator", "evaluator_train"),
              Phase("generator", "generator", "train"))
    sections = ("generator", "evaluator", "train", "evaluator_train", "reranker", "features")
    settable = ("reranker",)
    lists_name = None
    VARIANTS = ("generator_greedy", "generator_contrastive", "generator_beam", "generator_top_k",
                "generator_dpp", "evaluator_top_m")
    TABLE6 = {"nar4rec_vanilla": "vanilla (likelihood on every logged list)",
              "nar4rec_paper": "unlikelihood (eq. 15)"}
    TABLE7 = {"contrastive": "generator_contrastive", "greedy": "generator_greedy",
              "beam search": "generator_beam", "top-k sampling": "generator_top_k",
              "DPP": "generator_dpp", "pipeline (proposals + evaluator)": "nar4rec"}

    @classmethod
    def phase_config(cls, phase, config, train_paths, space):
        model_config = getattr(config, phase.section)
        if (phase.name == "generator" and model_config.objective == "unlikelihood"
                and model_config.tau is None):
            loader = RequestLoader(train_paths, space, batch_size=4096)
            model_config = resolve_tau(model_config, loader, max_requests=TAU_REQUESTS)
        return model_config

    @classmethod
    def loss(cls, phase, model_config, space, trained):
        if phase.name == "evaluator":
            return evaluator_step(model_config)
        judge = trained("evaluator") if model_config.needs_evaluator else None
        return generator_step(model_config, space.utility_weights, judge)

    @classmethod
    def companions(cls, config):
        """NAR4Rec at the paper's settings (`PAPER_SETTINGS`, configs/paper.toml), a row of
        its own beside the defaults; and Table 6's generator trained with vanilla (likelihood)
        training on the paper run's evaluator. Where `config` already is the paper's, the
        paper run is `config`'s own run, reused whole."""
        paper = paper_config(config)
        vanilla = dataclasses.replace(paper, generator=dataclasses.replace(
            paper.generator, objective="likelihood"))
        same = paper == config
        return {"nar4rec_paper": Companion(
                    paper, reuse={"evaluator": "nar4rec", "generator": "nar4rec"} if same else {},
                    row=True),
                "nar4rec_vanilla": Companion(vanilla, reuse={"evaluator": "nar4rec_paper"})}

    @property
    def generator(self) -> NAR4Rec:
        return self.modules["generator"]

    @torch.no_grad()
    def rerank(self, batch: RequestBatch) -> Reranked:
        return self.reranker.rerank(batch)

    @torch.no_grad()
    def evaluate(self, batch: RequestBatch, variants: bool = True
                 ) -> tuple[Ranking, dict[str, torch.Tensor]]:
        reranker = self.reranker
        out = self.generator(batch)
        exposure = out.probs.sum(-1).clamp(0.0, 1.0)                       # (B, n)
        ranking = Ranking(reranker.choose(batch, out).lists,
                          exposure.masked_fill(~batch.cand_mask, -torch.inf), exposure)
        if not variants:
            return ranking, {}
        config = reranker.config
        keys = request_keys(batch.user_cat, batch.cand_cat, batch.cand_mask)
        uniform = request_uniforms(keys, config.seed, 1, out.probs.shape[2])[:, 0]
        return ranking, {
            "generator_greedy": decode.greedy(out.probs, out.cand_mask),
            "generator_contrastive": decode.contrastive(
                out.probs, out.item_repr, out.cand_mask, alpha=config.contrastive_alpha,
                k=config.candidate_set, similarity=config.similarity),
            "generator_beam": decode.beam_search(out.probs, out.cand_mask),
            "generator_top_k": decode.top_k_sampling(
                out.probs, out.cand_mask, k=config.sample_k, temperature=config.temperature,
                uniform=uniform),
            "generator_dpp": decode.dpp(out.probs, out.item_repr, out.cand_mask),
            "evaluator_top_m": reranker.evaluator_top_m(batch).lists,
        }

    def inference_calls(self):
        """The paper's Table 4 times the generation (the generator's forward pass and
        contrastive decoding, under the model's name); then the whole pipeline."""
        config = self.reranker.config

        def generation(batch: RequestBatch) -> torch.Tensor:
            out = self.generator(batch)
            return decode.contrastive(out.probs, out.item_repr, out.cand_mask,
                                      alpha=config.contrastive_alpha, k=config.candidate_set,
                                      similarity=config.similarity)
        return {self.name: generation, f"{self.name}_pipeline": self.rerank}

    def graphs(self):
        """The pipeline (the system graph), and the generator and evaluator alone, which
        serve every other decoder."""
        from nar4rec.export import EvaluatorGraph, GeneratorGraph
        from nar4rec.system import FEATURE_INPUTS, Graph

        return {**super().graphs(),
                "generator": Graph(GeneratorGraph(self.generator), FEATURE_INPUTS,
                                   ("probs", "item_repr")),
                "evaluator": Graph(EvaluatorGraph(self.modules["evaluator"]),
                                   (*FEATURE_INPUTS, "lists", "list_mask"), ("logits",))}
