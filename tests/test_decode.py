"""Decoders: valid lists for every decoder, and each one checked against its own rule."""

from __future__ import annotations

import itertools

import pytest
import torch

from nar4rec.decode import (
    DECODERS,
    NO_ITEM,
    beam_search,
    contrastive,
    decode,
    dpp,
    greedy,
    top_k_sampling,
)
from nar4rec.errors import Nar4recError


def random_batch(batch: int, n: int, m: int, seed: int, *, d: int = 8,
                 full: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """probs (B, n, m) with columns summing to 1 over the real candidates, cand_mask (B, n)
    with 1..n real candidates per request (all n if `full`), item_repr (B, n, d)."""
    generator = torch.Generator().manual_seed(seed)
    real = torch.full((batch,), n) if full else torch.randint(1, n + 1, (batch,),
                                                              generator=generator)
    cand_mask = torch.arange(n)[None, :] < real[:, None]                     # (B, n)
    logits = 2.0 * torch.randn(batch, n, m, generator=generator)
    probs = logits.masked_fill(~cand_mask[..., None], -torch.inf).softmax(dim=1)
    item_repr = torch.randn(batch, n, d, generator=generator)
    return probs, cand_mask, item_repr


def list_log_prob(probs: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """sum_j log p(y_j | position j) of full lists (B, m): (B,)."""
    batch, _, m = probs.shape
    log_probs = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    return log_probs[torch.arange(batch)[:, None], lists, torch.arange(m)[None, :]].sum(dim=1)


def greedy_one(column_probs: torch.Tensor, real: int) -> list[int]:
    """Greedy decoding of one request by hand: probs (n, m), the first `real` candidates."""
    chosen: list[int] = []
    for position in range(column_probs.shape[1]):
        unused = [i for i in range(real) if i not in chosen]
        if not unused:
            chosen.append(NO_ITEM)
            continue
        chosen.append(max(unused, key=lambda i: column_probs[i, position].item()))
    return chosen


def assert_valid(lists: torch.Tensor, cand_mask: torch.Tensor, m: int) -> None:
    """(B, m) long; real candidates only, no repeats; -1 exactly after the real ones run out."""
    assert lists.shape == (cand_mask.shape[0], m)
    assert lists.dtype == torch.long
    real = cand_mask.sum(dim=1)
    for row, (items, count) in enumerate(zip(lists.tolist(), real.tolist(), strict=True)):
        placed = min(count, m)
        assert items[placed:] == [NO_ITEM] * (m - placed), (row, items)
        assert len(set(items[:placed])) == placed, (row, items)
        assert all(0 <= i < cand_mask.shape[1] and cand_mask[row, i] for i in items[:placed])


OPTIONS = {"greedy": {}, "contrastive": {"alpha": 0.6}, "beam_search": {"width": 3},
           "top_k_sampling": {"k": 3, "generator": None}, "dpp": {"theta": 0.7}}


@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("n, m", [(12, 4), (6, 6), (3, 5)])
def test_every_decoder_gives_valid_lists(name: str, n: int, m: int) -> None:
    probs, cand_mask, item_repr = random_batch(64, n, m, seed=n * 10 + m)
    options = dict(OPTIONS[name])
    if "generator" in options:
        options["generator"] = torch.Generator().manual_seed(0)
    lists = decode(name, probs, item_repr, cand_mask, **options)
    assert_valid(lists, cand_mask, m)


def test_registry_and_options_are_checked() -> None:
    probs, cand_mask, item_repr = random_batch(2, 5, 3, seed=0)
    with pytest.raises(Nar4recError, match="unknown decoder"):
        decode("nucleus", probs, item_repr, cand_mask)
    with pytest.raises(Nar4recError, match="alpha"):
        contrastive(probs, item_repr, cand_mask, alpha=1.5)
    with pytest.raises(Nar4recError, match="similarity"):
        contrastive(probs, item_repr, cand_mask, similarity="euclidean")
    with pytest.raises(Nar4recError, match="theta"):
        dpp(probs, item_repr, cand_mask, theta=1.0)
    with pytest.raises(ValueError, match="cand_mask"):
        greedy(probs, cand_mask[:, :-1])


def test_greedy_equals_brute_force_of_its_rule() -> None:
    probs, cand_mask, _ = random_batch(40, 7, 5, seed=1)
    lists = greedy(probs, cand_mask)
    for row in range(len(lists)):
        expected = greedy_one(probs[row], int(cand_mask[row].sum()))
        assert lists[row].tolist() == expected


def test_contrastive_with_alpha_zero_is_greedy() -> None:
    probs, cand_mask, item_repr = random_batch(64, 10, 4, seed=2)
    for similarity in ("cosine", "dot"):
        lists = contrastive(probs, item_repr, cand_mask, alpha=0.0, similarity=similarity)
        assert torch.equal(lists, greedy(probs, cand_mask))


def test_contrastive_with_one_alpha_per_row_equals_separate_calls() -> None:
    """The pipeline decodes all its alphas in one pass over stacked copies of a batch."""
    probs, cand_mask, item_repr = random_batch(50, 12, 5, seed=4)
    alphas = torch.tensor([0.0, 0.3, 0.9])
    stacked = contrastive(probs.repeat(3, 1, 1), item_repr.repeat(3, 1, 1),
                          cand_mask.repeat(3, 1), alpha=alphas.repeat_interleave(50))
    for index, alpha in enumerate(alphas.tolist()):
        assert torch.equal(stacked[50 * index:50 * (index + 1)],
                           contrastive(probs, item_repr, cand_mask, alpha=alpha))
    with pytest.raises(ValueError, match="alpha"):
        contrastive(probs, item_repr, cand_mask, alpha=alphas)           # wrong length
    with pytest.raises(Nar4recError, match="alpha"):
        contrastive(probs, item_repr, cand_mask, alpha=torch.full((50,), 1.5))


def contrastive_one(column_probs: torch.Tensor, vectors: torch.Tensor, real: int,
                    alpha: float, k: int | None) -> list[int]:
    """Contrastive search of one request by hand (SimCTG's rule, eq. 16 over V(k)): probs
    (n, m), unit vectors (n, d), the first `real` candidates."""
    chosen: list[int] = []
    for position in range(column_probs.shape[1]):
        unused = [i for i in range(real) if i not in chosen]
        if not unused:
            chosen.append(NO_ITEM)
            continue
        by_probability = sorted(unused, key=lambda i: -column_probs[i, position].item())
        kth = column_probs[by_probability[min(k or real, len(unused)) - 1], position].item()
        allowed = [i for i in unused if column_probs[i, position].item() >= kth]

        scores = {i: (1 - alpha) * column_probs[i, position].item() - alpha * max(
            (float(vectors[i] @ vectors[j]) for j in chosen), default=0.0) for i in allowed}
        best = max(scores.values())
        chosen.append(min(i for i in allowed if scores[i] == best))
    return chosen


@pytest.mark.parametrize("k", [1, 2, 3, 5, None])
def test_contrastive_equals_brute_force_of_its_rule(k: int | None) -> None:
    probs, cand_mask, item_repr = random_batch(40, 9, 5, seed=11)
    unit = torch.nn.functional.normalize(item_repr, dim=-1)
    for alpha in (0.3, 0.6, 0.9):
        lists = contrastive(probs, item_repr, cand_mask, alpha=alpha, k=k)
        for row in range(len(lists)):
            expected = contrastive_one(probs[row], unit[row], int(cand_mask[row].sum()),
                                       alpha, k)
            assert lists[row].tolist() == expected, (alpha, row)


def test_contrastive_candidate_set_bounds_the_choice() -> None:
    """k = 1 is greedy at any alpha; k >= n is the literal eq. 16; every pick with k = 3 is
    among the 3 most probable unplaced candidates; without V(k), a strong penalty leaves it."""
    probs, cand_mask, item_repr = random_batch(64, 12, 5, seed=12, full=True)
    assert torch.equal(contrastive(probs, item_repr, cand_mask, alpha=0.9, k=1),
                       greedy(probs, cand_mask))
    assert torch.equal(contrastive(probs, item_repr, cand_mask, alpha=0.6, k=12),
                       contrastive(probs, item_repr, cand_mask, alpha=0.6, k=None))

    def ranks(lists: torch.Tensor) -> torch.Tensor:
        """(B, m) the rank of each pick by probability among the unplaced candidates."""
        out = torch.zeros_like(lists)
        for position in range(lists.shape[1]):
            column = probs[:, :, position].clone()
            placed = lists[:, :position]
            column.scatter_(1, placed, -1.0)
            picked = column.gather(1, lists[:, position:position + 1])
            out[:, position] = (column > picked).sum(dim=1)
        return out
    assert ranks(contrastive(probs, item_repr, cand_mask, alpha=0.9, k=3)).max() <= 2
    assert ranks(contrastive(probs, item_repr, cand_mask, alpha=0.9, k=None)).max() > 2
    with pytest.raises(Nar4recError, match="k must be at least 1"):
        contrastive(probs, item_repr, cand_mask, k=0)


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_contrastive_skips_a_near_duplicate(similarity: str) -> None:
    # Items 0 and 1 are near-duplicates and the two most probable at both positions; item 2
    # is orthogonal to them and item 3 is padding.
    column = torch.tensor([0.5, 0.4, 0.1, 0.0])
    probs = column[None, :, None].repeat(1, 1, 2)                            # (1, 4, 2)
    item_repr = torch.tensor([[[1.0, 0.0], [0.99, 0.05], [0.0, 1.0], [1.0, 1.0]]])
    cand_mask = torch.tensor([[True, True, True, False]])
    assert greedy(probs, cand_mask).tolist() == [[0, 1]]
    lists = contrastive(probs, item_repr, cand_mask, alpha=0.6, similarity=similarity)
    assert lists.tolist() == [[0, 2]]


def test_contrastive_penalty_is_the_max_over_placed_items() -> None:
    # After placing 0 and 2, candidate 1 duplicates 0 and candidate 3 half-resembles 2:
    # the penalty of 1 is its similarity to 0 (the max), so 3 comes before 1.
    probs = torch.tensor([[[0.7, 0.1, 0.1], [0.1, 0.4, 0.4], [0.1, 0.3, 0.1],
                           [0.1, 0.2, 0.4]]])                                # (1, 4, 3)
    item_repr = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    cand_mask = torch.ones(1, 4, dtype=torch.bool)
    assert contrastive(probs, item_repr, cand_mask, alpha=0.5).tolist() == [[0, 2, 3]]


def test_contrastive_with_pairwise_similarities_equals_the_vectors_they_come_from() -> None:
    probs, cand_mask, item_repr = random_batch(40, 12, 5, seed=6)
    unit = torch.nn.functional.normalize(item_repr, dim=-1)
    pairwise = unit @ unit.transpose(1, 2)                                   # (B, n, n)
    for alpha in (0.0, 0.3, 0.7):
        assert torch.equal(contrastive(probs, None, cand_mask, alpha=alpha, pairwise=pairwise),
                           contrastive(probs, item_repr, cand_mask, alpha=alpha))
    with pytest.raises(ValueError, match="pairwise"):
        contrastive(probs, None, cand_mask, pairwise=pairwise[:, :, :5])
    with pytest.raises(ValueError, match="needs item_repr or pairwise"):
        contrastive(probs, None, cand_mask)


def test_beam_search_with_enough_beams_is_exhaustive() -> None:
    n, m = 5, 3
    probs, cand_mask, _ = random_batch(30, n, m, seed=3, full=True)
    permutations = torch.tensor(list(itertools.permutations(range(n), m)))  # (P, m)
    lists = beam_search(probs, cand_mask, width=len(permutations))
    for row in range(len(probs)):
        scores = list_log_prob(probs[row:row + 1].expand(len(permutations), -1, -1),
                               permutations)
        assert lists[row].tolist() == permutations[scores.argmax()].tolist()


def test_beam_search_of_width_one_is_greedy() -> None:
    probs, cand_mask, _ = random_batch(64, 9, 4, seed=4)
    assert torch.equal(beam_search(probs, cand_mask, width=1), greedy(probs, cand_mask))


def test_beam_search_beats_greedy_on_short_lists_and_on_average() -> None:
    # For m <= 2 greedy's list is one of the extensions beam search compares, so it never
    # loses; for longer lists it can (next test), but not on average.
    probs, cand_mask, _ = random_batch(500, 8, 2, seed=5, full=True)
    beam = list_log_prob(probs, beam_search(probs, cand_mask, width=2))
    assert (beam >= list_log_prob(probs, greedy(probs, cand_mask)) - 1e-5).all()
    probs, cand_mask, _ = random_batch(500, 8, 5, seed=6, full=True)
    for width in (2, 4):
        beam = list_log_prob(probs, beam_search(probs, cand_mask, width=width))
        assert beam.mean() > list_log_prob(probs, greedy(probs, cand_mask)).mean()


def test_beam_search_can_lose_to_greedy() -> None:
    # Beam search drops greedy's prefix (2, 0, 1) after position 3 and is left with lists
    # that used item 3, which the last position needs: this is beam search working as
    # specified, not a bug. Rows are positions here; probs is their transpose.
    by_position = torch.tensor([[0.1, 0.1, 0.5, 0.3], [0.1, 0.05, 0.8, 0.05],
                                [0.6, 0.3, 0.05, 0.05], [0.01, 0.01, 0.01, 0.97]])
    probs = by_position.T[None]                                              # (1, 4, 4)
    cand_mask = torch.ones(1, 4, dtype=torch.bool)
    beam = beam_search(probs, cand_mask, width=2)
    assert beam.tolist() == [[3, 2, 0, 1]]
    assert greedy(probs, cand_mask).tolist() == [[2, 0, 1, 3]]
    assert list_log_prob(probs, beam) < list_log_prob(probs, greedy(probs, cand_mask))


def test_top_k_sampling_stays_in_the_top_k_and_is_reproducible() -> None:
    k = 3
    probs, cand_mask, _ = random_batch(50, 9, 5, seed=7)
    lists = top_k_sampling(probs, cand_mask, k=k, generator=torch.Generator().manual_seed(11))
    for row in range(len(lists)):
        placed: list[int] = []
        for position, item in enumerate(lists[row].tolist()):
            if item == NO_ITEM:
                break
            unused = [i for i in range(probs.shape[1]) if cand_mask[row, i] and i not in placed]
            top = sorted(unused, key=lambda i: -probs[row, i, position].item())[:k]
            assert item in top
            placed.append(item)
    again = top_k_sampling(probs, cand_mask, k=k, generator=torch.Generator().manual_seed(11))
    other = top_k_sampling(probs, cand_mask, k=k, generator=torch.Generator().manual_seed(12))
    assert torch.equal(lists, again)
    assert not torch.equal(lists, other)
    one = top_k_sampling(probs, cand_mask, k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one, greedy(probs, cand_mask))


@pytest.mark.parametrize("source", ["generator", "uniform"])
def test_top_k_sampling_follows_the_probabilities(source) -> None:
    # One position, candidates with p = 0.6, 0.3, 0.1 and k = 2: candidate 2 never, and 0
    # about twice as often as 1 (0.6 / 0.9 of the draws).
    probs = torch.tensor([0.6, 0.3, 0.1])[None, :, None].expand(4000, 3, 1)
    cand_mask = torch.ones(4000, 3, dtype=torch.bool)
    draws = {"generator": torch.Generator().manual_seed(0)} if source == "generator" else \
        {"uniform": torch.rand(4000, 1, generator=torch.Generator().manual_seed(0))}
    lists = top_k_sampling(probs, cand_mask, k=2, **draws)
    share = (lists[:, 0] == 0).float().mean().item()
    assert (lists[:, 0] != 2).all()
    assert abs(share - 2 / 3) < 0.03


def test_dpp_with_equal_quality_picks_one_item_per_cluster() -> None:
    # 3 clusters of 3 near-identical representations, candidates shuffled per request,
    # equal probabilities everywhere: the 3 picks come from 3 different clusters.
    batch, clusters, per_cluster = 16, 3, 3
    n = clusters * per_cluster
    generator = torch.Generator().manual_seed(8)
    centres = torch.randn(clusters, 16, generator=generator)
    cluster_of = torch.stack([torch.randperm(n, generator=generator) % clusters
                              for _ in range(batch)])                        # (B, n)
    item_repr = centres[cluster_of] + 0.05 * torch.randn(batch, n, 16, generator=generator)
    probs = torch.full((batch, n, clusters), 1.0 / n)
    lists = dpp(probs, item_repr, torch.ones(batch, n, dtype=torch.bool), theta=0.7)
    picked_clusters = cluster_of.gather(1, lists)                            # (B, 3)
    assert all(len(set(row)) == clusters for row in picked_clusters.tolist())


def test_dpp_with_orthogonal_items_follows_quality() -> None:
    # S = I: det L_Y is the product of the qualities, so items come in order of relevance.
    probs, cand_mask, _ = random_batch(32, 6, 4, seed=9, full=True)
    item_repr = torch.eye(6).expand(32, 6, 6)
    lists = dpp(probs, item_repr, cand_mask, theta=0.5)
    expected = probs.sum(dim=2).argsort(dim=1, descending=True)[:, :4]
    assert torch.equal(lists, expected)


def dpp_one(probs: torch.Tensor, vectors: torch.Tensor, m: int, theta: float,
            relevance: str, jitter: float = 1e-6) -> list[int]:
    """Greedy MAP inference of one request by hand: at each step the candidate that maximises
    det L_Y of the list so far, L = diag(q) (S + jitter I) diag(q) (Chen et al. 2018)."""
    exposure = probs.double().sum(dim=1)                                     # (n,)
    score = exposure.log() if relevance == "log" else exposure
    quality = torch.exp(theta / (2 * (1 - theta)) * score)
    unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
    kernel = quality[:, None] * (unit @ unit.T + jitter * torch.eye(len(unit))) * quality[None]
    chosen: list[int] = []
    for _ in range(m):
        gains = {i: torch.linalg.det(kernel[chosen + [i]][:, chosen + [i]]).item()
                 for i in range(len(unit)) if i not in chosen}
        chosen.append(max(gains, key=gains.get))
    return chosen


@pytest.mark.parametrize("relevance", ["probability", "log"])
def test_dpp_equals_brute_force_greedy_map(relevance: str) -> None:
    probs, cand_mask, item_repr = random_batch(24, 7, 4, seed=13, full=True)
    for theta in (0.3, 0.7, 0.95):
        lists = dpp(probs, item_repr, cand_mask, theta=theta, relevance=relevance)
        for row in range(len(lists)):
            assert lists[row].tolist() == dpp_one(probs[row], item_repr[row], 4, theta,
                                                  relevance), (theta, row)


def test_dpp_log_relevance_weighs_probability_more() -> None:
    # Two near-duplicates with most of the probability, a third item orthogonal to them with
    # little: on a log scale the duplicate's probability outweighs the diversity at theta =
    # 0.7; with the probability itself as relevance (in [0, 1]) diversity wins.
    probs = torch.tensor([[[0.6, 0.6], [0.39, 0.39], [0.01, 0.01]]])         # (1, 3, 2)
    item_repr = torch.tensor([[[1.0, 0.0], [0.95, 0.31], [0.0, 1.0]]])
    cand_mask = torch.ones(1, 3, dtype=torch.bool)
    assert dpp(probs, item_repr, cand_mask, theta=0.7, relevance="log").tolist() == [[0, 1]]
    assert dpp(probs, item_repr, cand_mask, theta=0.7,
               relevance="probability").tolist() == [[0, 2]]
    with pytest.raises(Nar4recError, match="relevance"):
        dpp(probs, item_repr, cand_mask, relevance="rank")


def test_decoders_handle_zero_probabilities() -> None:
    # Real candidates the model gives probability 0 are still placed, never padding.
    probs = torch.zeros(8, 4, 3)
    probs[:, 0, :] = 1.0
    cand_mask = torch.tensor([True, True, True, False]).expand(8, 4)
    item_repr = torch.randn(8, 4, 5, generator=torch.Generator().manual_seed(0))
    for name in DECODERS:
        options = dict(OPTIONS[name])
        if "generator" in options:
            options["generator"] = torch.Generator().manual_seed(0)
        lists = decode(name, probs, item_repr, cand_mask, **options)
        assert_valid(lists, cand_mask, 3)
        if name != "dpp":
            assert (lists[:, 0] == 0).all(), name
