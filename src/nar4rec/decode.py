"""Probability matrix -> lists: the decoders of the paper's Table 7, batched over requests.

Every decoder reads the generator's probability matrix `probs` (B, n, m), whose column j is a
distribution over the n candidates for position j (eq. 12) and is zero on padded candidates,
and returns `lists` (B, m): candidate indices, position by position. A list never holds a
candidate twice and never a padded one. A request with fewer than m real candidates gets all of
them, then `NO_ITEM` (-1) in the remaining positions; -1 indexes the last element in torch and
numpy, so mask it (`lists >= 0`) before gathering with it.

Decoders loop over the m positions (or decoding steps), never over requests. They take no
gradient and do not change their inputs. `DECODERS` maps a name to each decoder behind one
signature, `(probs, item_repr, cand_mask, **options)`, and `decode` calls one by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from nar4rec.errors import Nar4recError

NO_ITEM = -1
SIMILARITIES = ("cosine", "dot")
DPP_RELEVANCES = ("probability", "log")
# Decoding defaults, chosen on the validation splits of kuaishou and movielens (seeds 0 and 1)
# as the setting whose smaller gain over greedy decoding of the two is largest (docs/models.md,
# "Choosing the decoders' defaults"): SimCTG's candidate set V(k) and the penalty's weight of
# contrastive decoding, and the trade-off and relevance scale of DPP.
CONTRASTIVE_K = 2
CONTRASTIVE_ALPHA = 0.1
DPP_THETA = 0.99
DPP_RELEVANCE = "log"

Decoder = Callable[..., torch.Tensor]


@torch.no_grad()
def greedy(probs: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
    """At each position, the most probable candidate not yet placed (Table 7, "Greedy").

    Args:
        probs: (B, n, m) probability matrix, column j = p(candidate | position j) (eq. 12).
        cand_mask: (B, n) True on real candidates.
    Returns:
        (B, m) candidate indices, NO_ITEM where a request has run out of candidates. Ties go to
        the lowest candidate index.
    """
    batch, _, m = _check(probs, cand_mask)
    available = cand_mask.clone()                                            # (B, n)
    lists = torch.full((batch, m), NO_ITEM, dtype=torch.long, device=probs.device)
    for position in range(m):
        lists[:, position] = _take_best(probs[:, :, position], available)
    return lists


@torch.no_grad()
def contrastive(probs: torch.Tensor, item_repr: torch.Tensor | None, cand_mask: torch.Tensor, *,
                alpha: float | torch.Tensor = CONTRASTIVE_ALPHA,
                k: int | None = CONTRASTIVE_K,
                similarity: str = "cosine",
                pairwise: torch.Tensor | None = None) -> torch.Tensor:
    """NAR4Rec's contrastive decoding (section 4.3, eq. 16-17), SimCTG's contrastive search.

    y_t = argmax_{x in V(k)} (1 - alpha) * p(x | position t) - alpha * max_{j < t} s(x, y_j),
    where V(k) holds the k most probable candidates for position t among those not yet placed;
    the penalty is 0 at t = 0.

    Section 4.3 follows SimCTG (Su et al., "A Contrastive Framework for Neural Text
    Generation", NeurIPS 2022, eq. 5 and its reference code), whose argmax ranges only over
    V(k) and whose p is the model's full probability (not renormalised over V(k)). NAR4Rec's
    eq. 16 writes the argmax over all candidates: that is `k=None` (or k >= n). Without the
    candidate set, the penalty can pick a candidate the generator gives almost no probability,
    as long as it is unlike the ones placed (docs/results.md measures what that costs).

    Args:
        probs: (B, n, m) probability matrix (eq. 12).
        item_repr: (B, n, d) candidate representations (the candidates encoder's output).
        cand_mask: (B, n) True on real candidates.
        alpha: weight of the similarity penalty, in [0, 1]; the paper's best NDCG is near 0.6
            (Fig. 4). alpha = 0 is greedy decoding. A (B,) tensor gives each row its own
            weight (several alphas decoded in one pass over stacked copies of a batch).
        k: size of the candidate set V(k), >= 1; k = 1 is greedy decoding, None (or k >= n)
            the literal reading of eq. 16. Candidates tied with the k-th most probable are
            all in V(k).
        similarity: "cosine" (the paper, eq. 17) or "dot" (the authors' deployment, per their
            later writing). A dot product is not bounded, so the useful alpha depends on the
            scale of the representations.
        pairwise: (B, n, n) similarities of every two candidates to use instead of those of
            item_repr (which may then be None), for example the evaluator's learned ones
            (`Evaluator.candidate_similarity`).
    Returns:
        (B, m) candidate indices, NO_ITEM where a request has run out of candidates.
    """
    if item_repr is None and pairwise is None:
        raise ValueError("contrastive decoding needs item_repr or pairwise similarities")
    batch, n, m = _check(probs, cand_mask, item_repr, pairwise)
    if isinstance(alpha, torch.Tensor):
        weight = alpha.to(probs.dtype)
        if weight.dim() > 1 or (weight.dim() == 1 and len(weight) != batch):
            raise ValueError(f"alpha must be a number or a (B,) = ({batch},) tensor, got "
                             f"shape {tuple(weight.shape)}")
        # (a traced or captured graph, as in `nar4rec export` and `cuda_graphs`, cannot
        # branch on data; its alphas were checked)
        if not _in_graph() and not bool(((weight >= 0) & (weight <= 1)).all()):
            raise Nar4recError(f"contrastive decoding: alpha must be in [0, 1], got {alpha}")
        weight = weight[:, None] if weight.dim() == 1 else weight            # (B, 1) or ()
    else:                   # a number stays one: no tensor copied to the device per call
        if not 0.0 <= alpha <= 1.0:
            raise Nar4recError(f"contrastive decoding: alpha must be in [0, 1], got {alpha}")
        weight = float(alpha)
    if k is not None and k < 1:
        raise Nar4recError(f"contrastive decoding: k must be at least 1, got {k}")
    if similarity not in SIMILARITIES:
        raise Nar4recError(f"contrastive decoding: similarity must be one of {SIMILARITIES}, "
                           f"got {similarity!r}")
    if pairwise is None:
        vectors = F.normalize(item_repr, dim=-1) if similarity == "cosine" else item_repr
    rows = torch.arange(batch, device=probs.device)
    available = cand_mask.clone()
    lists = torch.full((batch, m), NO_ITEM, dtype=torch.long, device=probs.device)
    penalty = torch.zeros(batch, n, dtype=probs.dtype, device=probs.device)  # (B, n)
    for position in range(m):
        column = probs[:, :, position]                                       # (B, n)
        scores = (1.0 - weight) * column - weight * penalty                  # (B, n)
        if k is not None:
            scores = scores.masked_fill(~_most_probable(column, available, k), -torch.inf)
        picked = _take_best(scores, available)                               # (B,)
        lists[:, position] = picked
        if pairwise is None:
            chosen = vectors[rows, picked.clamp_min(0)]                      # (B, d)
            to_chosen = torch.einsum("bnd,bd->bn", vectors, chosen)          # (B, n)
        else:
            to_chosen = pairwise[rows, picked.clamp_min(0)].to(probs.dtype)  # (B, n)
        penalty = to_chosen if position == 0 else torch.maximum(penalty, to_chosen)
    return lists


@torch.no_grad()
def beam_search(probs: torch.Tensor, cand_mask: torch.Tensor, *, width: int = 4) -> torch.Tensor:
    """The list maximising sum_j log p(y_j | position j) among `width` beams (Table 7).

    All B * width beams advance together: at each position every beam is extended by every
    candidate it has not used, and the `width` best extensions of each request survive.
    Zero probabilities count as the smallest positive float, so that a real candidate stays
    distinguishable from a used or padded one (which scores -inf).

    Args:
        probs: (B, n, m) probability matrix (eq. 12).
        cand_mask: (B, n) True on real candidates.
        width: beams kept per request; 1 is greedy decoding.
    Returns:
        (B, m) candidate indices of each request's best beam, NO_ITEM where a request has run
        out of candidates.
    """
    batch, n, m = _check(probs, cand_mask)
    if width < 1:
        raise Nar4recError(f"beam search: width must be at least 1, got {width}")
    device = probs.device
    lists = torch.full((batch, m), NO_ITEM, dtype=torch.long, device=device)
    if n == 0:
        return lists
    log_probs = probs.float().clamp_min(torch.finfo(torch.float32).tiny).log()  # (B, n, m)
    real = cand_mask.sum(dim=1)                                              # (B,)
    beams = torch.arange(width, device=device).expand(batch, width)          # (B, W)
    score = torch.full((batch, width), -torch.inf, device=device)            # (B, W)
    score[:, 0] = 0.0   # one live beam at the start, so that no two beams are the same list
    used = (~cand_mask)[:, None, :].expand(batch, width, n).clone()          # (B, W, n)
    prefixes = torch.zeros((batch, width, 0), dtype=torch.long, device=device)
    for position in range(m):
        extended = score[:, :, None] + log_probs[:, None, :, position]       # (B, W, n)
        extended = extended.masked_fill(used, -torch.inf).reshape(batch, width * n)
        best, flat = extended.topk(width, dim=1)             # (B, W)
        parent, item = beam_origin(flat, n)
        active = (position < real)[:, None]                                  # (B, 1)
        parent = torch.where(active, parent, beams)
        item = torch.where(active, item, NO_ITEM)
        score = torch.where(active, best, score)
        prefixes = torch.cat([prefixes.gather(1, parent[..., None].expand(-1, -1, position)),
                              item[..., None]], dim=2)                       # (B, W, t + 1)
        used = used.gather(1, parent[..., None].expand(-1, -1, n))
        used.scatter_(2, item.clamp_min(0)[..., None], True)
    winner = score.argmax(dim=1)                                             # (B,)
    return prefixes[torch.arange(batch, device=device), winner]


@torch.no_grad()
def top_k_sampling(probs: torch.Tensor, cand_mask: torch.Tensor, *, k: int = 5,
                   generator: torch.Generator | None = None,
                   temperature: float = 1.0,
                   uniform: torch.Tensor | None = None) -> torch.Tensor:
    """At each position, sample among the k most probable candidates not yet placed (Table 7).

    Within the k, a candidate is drawn with probability proportional to p ** (1 / temperature);
    if all k have probability 0 the draw is uniform among them.

    Args:
        probs: (B, n, m) probability matrix (eq. 12).
        cand_mask: (B, n) True on real candidates.
        k: how many of the most probable unused candidates each position samples from.
        generator: a seeded torch.Generator on probs' device, for reproducible lists.
        temperature: > 0; below 1 sharpens the draw towards greedy decoding.
        uniform: (B, m) numbers in [0, 1), one per request and position, drawn by the caller
            (inverse-CDF sampling): a request's list then depends on its own numbers only,
            not on the other requests of the batch. Overrides `generator`.
    Returns:
        (B, m) candidate indices, NO_ITEM where a request has run out of candidates.
    """
    batch, n, m = _check(probs, cand_mask)
    if k < 1:
        raise Nar4recError(f"top-k sampling: k must be at least 1, got {k}")
    if not temperature > 0:
        raise Nar4recError(f"top-k sampling: temperature must be > 0, got {temperature}")
    device = probs.device
    available = cand_mask.clone()
    lists = torch.full((batch, m), NO_ITEM, dtype=torch.long, device=device)
    if n == 0:
        return lists
    for position in range(m):
        column = probs[:, :, position].float().masked_fill(~available, -1.0)  # (B, n)
        top_p, top_index = column.topk(min(k, n), dim=1)                     # (B, k)
        allowed = top_p >= 0.0                                               # (B, k) real, unused
        has_any = allowed.any(dim=1)                                         # (B,)
        logits = top_p.clamp_min(0.0).log() / temperature                    # (B, k)
        all_zero = ~(torch.isfinite(logits) & allowed).any(dim=1, keepdim=True)
        logits = torch.where(all_zero, 0.0, logits)   # uniform over the k when all have p = 0
        logits = logits.masked_fill(~allowed, -torch.inf)
        logits[:, 0] = torch.where(has_any, logits[:, 0], 0.0)  # any draw; replaced by NO_ITEM
        if uniform is None:
            draw = torch.multinomial(logits.softmax(dim=1), 1, generator=generator)  # (B, 1)
        else:
            below = logits.softmax(dim=1).cumsum(dim=1) <= uniform[:, position, None]
            draw = below.sum(dim=1, keepdim=True).clamp_max(top_p.shape[1] - 1)  # (B, 1)
            # never a disallowed slot: those have probability 0 and sit after the allowed ones
            draw = torch.minimum(draw, (allowed.sum(1, keepdim=True) - 1).clamp_min(0))
        picked = torch.where(has_any, top_index.gather(1, draw).squeeze(1), NO_ITEM)  # (B,)
        available.scatter_(1, picked.clamp_min(0)[:, None], False)   # (no host copy: a CUDA
        # graph can hold it)
        lists[:, position] = picked
    return lists


@torch.no_grad()
def dpp(probs: torch.Tensor, item_repr: torch.Tensor, cand_mask: torch.Tensor, *,
        theta: float = DPP_THETA, relevance: str = DPP_RELEVANCE,
        jitter: float = 1e-6) -> torch.Tensor:
    """Deep DPP decoding (Table 7): greedy MAP inference of a determinantal point process.

    The kernel is L = diag(q) (S + jitter I) diag(q), S the cosine similarity of item_repr (a
    Gram matrix of unit vectors, so positive semi-definite; the jitter keeps L positive
    definite so that a full list can always be picked). The quality is q = exp(a * r) with
    a = theta / (2 (1 - theta)): Chen, Zhang, Zhou, "Fast Greedy MAP Inference for
    Determinantal Point Process", NeurIPS 2018, section 4, where log det L = (theta / (1 -
    theta)) sum r + log det S, so theta trades relevance (theta -> 1) against diversity (theta =
    0). The greedy steps use the paper's incremental Cholesky updates (Algorithm 1), batched,
    in float64. Items are placed in the order they were selected.

    The relevance r of a candidate comes from its row of probs, e = sum_j p(x | position j),
    its expected number of positions. Chen et al. add r to a log-determinant, so r must be on
    a log scale (their r is a model's score, whose differences span several units): "log"
    takes r = log e, and the objective is theta sum log e + (1 - theta) log det S, a weighted
    sum of the list's log-probability and its diversity. "probability" takes r = e itself,
    which lies in [0, 1], so even at theta = 0.7 a candidate's quality varies by at most a
    factor exp(a) = 3.2 and diversity decides the list (docs/results.md measures both).

    Args:
        probs: (B, n, m) probability matrix (eq. 12).
        item_repr: (B, n, d) candidate representations.
        cand_mask: (B, n) True on real candidates.
        theta: relevance-diversity trade-off in [0, 1).
        relevance: "probability" (r = e) or "log" (r = log e), see above.
        jitter: added to the diagonal of S.
    Returns:
        (B, m) candidate indices, NO_ITEM where a request has run out of candidates.
    """
    batch, n, m = _check(probs, cand_mask, item_repr)
    if not 0.0 <= theta < 1.0:
        raise Nar4recError(f"DPP decoding: theta must be in [0, 1), got {theta}")
    if not jitter >= 0.0:
        raise Nar4recError(f"DPP decoding: jitter must be >= 0, got {jitter}")
    if relevance not in DPP_RELEVANCES:
        raise Nar4recError(f"DPP decoding: relevance must be one of {DPP_RELEVANCES}, got "
                           f"{relevance!r}")
    device = probs.device
    if n == 0:
        return torch.full((batch, m), NO_ITEM, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    exposure = probs.double().sum(dim=2)                                     # (B, n) e
    score = exposure.log() if relevance == "log" else exposure
    score = score.masked_fill(~cand_mask, -torch.inf)                        # (B, n) r
    # Dividing q by a per-request constant leaves the selection unchanged and avoids overflow.
    top = score.amax(dim=1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    quality = torch.exp(theta / (2.0 * (1.0 - theta)) * (score - top))       # (B, n)
    vectors = F.normalize(item_repr.double(), dim=-1)                        # (B, n, d)
    residual = quality ** 2 * ((vectors * vectors).sum(dim=-1) + jitter)     # (B, n) d_i^2
    cholesky = torch.zeros((batch, m, n), dtype=torch.float64, device=device)  # rows c_i
    available = cand_mask.clone()
    lists = torch.full((batch, m), NO_ITEM, dtype=torch.long, device=device)
    for step in range(m):
        picked = _take_best(residual, available)                             # (B,)
        lists[:, step] = picked
        chosen = picked.clamp_min(0)
        kernel_row = quality[rows, chosen, None] * quality * (
            torch.einsum("bnd,bd->bn", vectors, vectors[rows, chosen])
            + jitter * F.one_hot(chosen, n).double())                        # (B, n) L[j, :]
        explained = torch.einsum("bt,btn->bn", cholesky[rows, :step, chosen],
                                 cholesky[:, :step])                         # (B, n)
        scale = residual[rows, chosen].clamp_min(torch.finfo(torch.float64).tiny).sqrt()
        update = (kernel_row - explained) / scale[:, None]                   # (B, n)
        cholesky[:, step] = update
        residual = residual - update ** 2
    return lists


def beam_origin(flat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(parent beam, candidate) of each index into beams' extensions flattened as
    (width * n): the bookkeeping of every beam search here (`beam_search`, Edge-rerank's,
    Seq2Slate's). A floor division and a product, not `%`, which the ONNX exporter cannot
    take with a dynamic n."""
    parent = torch.div(flat, n, rounding_mode="floor")
    return parent, flat - parent * n


def _without_repr(decoder: Callable[..., torch.Tensor]) -> Decoder:
    """Adapt a decoder that needs no representations to the registry's signature."""
    def adapted(probs: torch.Tensor, item_repr: torch.Tensor | None, cand_mask: torch.Tensor,
                **options) -> torch.Tensor:
        return decoder(probs, cand_mask, **options)
    adapted.__name__ = decoder.__name__
    adapted.__doc__ = decoder.__doc__
    return adapted


DECODERS: dict[str, Decoder] = {
    "contrastive": contrastive,
    "greedy": _without_repr(greedy),
    "beam_search": _without_repr(beam_search),
    "top_k_sampling": _without_repr(top_k_sampling),
    "dpp": dpp,
}


def decode(name: str, probs: torch.Tensor, item_repr: torch.Tensor | None,
           cand_mask: torch.Tensor, **options) -> torch.Tensor:
    """Decode with the decoder registered as `name`: (B, n, m) probs -> (B, m) lists."""
    if name not in DECODERS:
        raise Nar4recError(f"unknown decoder {name!r}; choose from {sorted(DECODERS)}")
    return DECODERS[name](probs, item_repr, cand_mask, **options)


def _check(probs: torch.Tensor, cand_mask: torch.Tensor,
           item_repr: torch.Tensor | None = None,
           pairwise: torch.Tensor | None = None) -> tuple[int, int, int]:
    """Shapes (B, n, m), (B, n), (B, n, d) and (B, n, n); returns B, n, m."""
    if probs.dim() != 3:
        raise ValueError(f"probs must be (B, n, m), got shape {tuple(probs.shape)}")
    batch, n, m = probs.shape
    if tuple(cand_mask.shape) != (batch, n) or cand_mask.dtype != torch.bool:
        raise ValueError(f"cand_mask must be a bool (B, n) = ({batch}, {n}) tensor, got "
                         f"{cand_mask.dtype} {tuple(cand_mask.shape)}")
    if item_repr is not None and (item_repr.dim() != 3 or item_repr.shape[:2] != (batch, n)):
        raise ValueError(f"item_repr must be (B, n, d) with B, n = {batch}, {n}, got "
                         f"{tuple(item_repr.shape)}")
    if pairwise is not None and tuple(pairwise.shape) != (batch, n, n):
        raise ValueError(f"pairwise must be (B, n, n) = ({batch}, {n}, {n}), got "
                         f"{tuple(pairwise.shape)}")
    return batch, n, m


def _in_graph() -> bool:
    """True while a graph is traced (torch.compile, ONNX export) or a CUDA graph captured."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available()
                                             and torch.cuda.is_current_stream_capturing())


def _most_probable(column: torch.Tensor, available: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n) True on the k most probable available candidates of column (B, n), and on those
    tied with the k-th; every available one where fewer than k are left."""
    masked = column.masked_fill(~available, -torch.inf)                      # (B, n)
    # k columns of -inf appended, so that topk never asks for more than there are, without a
    # branch on n (which is dynamic in the exported graph)
    padded = torch.cat([masked, masked.new_full((len(masked), k), -torch.inf)], dim=1)
    kth = padded.topk(k, dim=1).values[:, -1:]                               # (B, 1)
    return available & (masked >= kth)


def _take_best(scores: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Argmax of scores (B, n) over available candidates, which it marks used: (B,).

    NO_ITEM where a request has none left; ties go to the lowest index.
    """
    rows = torch.arange(len(scores), device=scores.device)
    if scores.shape[1] == 0:
        return torch.full((len(scores),), NO_ITEM, dtype=torch.long, device=scores.device)
    picked = scores.masked_fill(~available, -torch.inf).argmax(dim=1)        # (B,)
    # An available candidate scored -inf ties with the used ones: take the first available.
    picked = torch.where(available[rows, picked], picked, available.byte().argmax(dim=1))
    has_any = available.any(dim=1)
    available.scatter_(1, picked[:, None], False)     # (indexed assignment of a Python bool
    # copies it from the host, which a CUDA graph cannot hold)
    return torch.where(has_any, picked, NO_ITEM)
