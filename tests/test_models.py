"""The NAR4Rec generator, the sequence evaluator and their losses."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers import ragged, simulate_small
from nar4rec.data.batch import PAD
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.models.evaluator import (
    Evaluator,
    EvaluatorConfig,
    Redundancy,
    evaluator_loss,
    predicted_list_utility,
)
from nar4rec.models.layers import FeatureEmbedding
from nar4rec.models.nar4rec import (
    NAR4Rec,
    NAR4RecConfig,
    consistency_loss,
    contrastive_loss,
    exposed_log_probs,
    generator_loss,
    likelihood_loss,
    list_log_probs,
    preference_loss,
    resolve_tau,
    self_critical_loss,
    unlikelihood_loss,
    utility_of_feedback,
    utility_threshold,
)

SMALL = dict(d_model=16, heads=2, layers=2, ff_mult=2, embedding_dim=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "data"
    simulate_small(out, requests=3000)
    space = FeatureSpace.fit([out / "train.parquet"])
    train = list(RequestLoader([out / "train.parquet"], space, batch_size=32, shuffle=True))
    valid = list(RequestLoader([out / "valid.parquet"], space, batch_size=300))
    return {"out": out, "space": space, "train": train, "valid": valid}


def generator(space, **overrides) -> NAR4Rec:
    torch.manual_seed(0)
    """A small generator; its objective learns from the logged lists alone (the judged terms,
    consistency training among them, only where `overrides` turn them on)."""
    return NAR4Rec(NAR4RecConfig(**{**SMALL, "gumbel_weight": 0.0, **overrides}), space)


def test_feature_embedding_shapes_and_padding(data):
    batch = data["train"][0]
    users = FeatureEmbedding.for_users(data["space"], 24)
    candidates = FeatureEmbedding.for_candidates(data["space"], 24, upstream_score=True)
    assert users(batch).shape == (len(batch), 24)
    assert candidates(batch).shape == (len(batch), batch.cand_mask.shape[1], 24)
    assert all(table.weight[PAD].abs().sum() == 0 for table in candidates.tables)


@pytest.mark.parametrize("conditioning", ["add", "token"])
def test_probability_matrix_sums_to_one_and_ignores_padding(data, conditioning):
    batch = ragged(data["train"][0], [60, 10, 3, 1])
    model = generator(data["space"], user_conditioning=conditioning).eval()
    with torch.no_grad():
        out = model(batch)
    assert out.probs.shape == (4, 60, 6) and out.logits.shape == (4, 60, 6)
    assert out.item_repr.shape == (4, 60, 16) and out.position_repr.shape == (4, 6, 16)
    torch.testing.assert_close(out.probs.sum(1), torch.ones(4, 6))
    assert (out.probs[~batch.cand_mask] == 0).all()            # exactly zero on padding
    assert (out.probs[3, 0] == 1).all()                        # a single candidate takes all
    assert (out.item_repr[~batch.cand_mask] == 0).all()
    # What sits in the padded slots does not change anything about the real candidates.
    noisy = dataclasses.replace(
        batch, cand_num=torch.where(batch.cand_mask[..., None], batch.cand_num, 9.0),
        cand_cat=torch.where(batch.cand_mask[..., None], batch.cand_cat, 1))
    with torch.no_grad():
        again = model(noisy)
    torch.testing.assert_close(again.probs, out.probs)


@pytest.mark.parametrize("source", ["self_attention", "layer_output"])
def test_positions_cross_attend_to_candidates_of_the_same_layer(data, source):
    batch = data["train"][0]
    model = generator(data["space"], cross_attention_source=source, layers=3).eval()
    candidate_states, memories = [], []
    hooks = [layer.register_forward_hook(
        lambda _m, _args, output: candidate_states.append(output))
        for layer in model.candidate_layers]
    hooks += [layer.register_forward_hook(
        lambda _m, args, _output: memories.append(args[1]))
        for layer in model.position_layers]
    with torch.no_grad():
        model(batch)
    for hook in hooks:
        hook.remove()
    assert len(memories) == len(candidate_states) == 3
    pick = 0 if source == "self_attention" else 1
    for layer, memory in enumerate(memories):
        assert memory is candidate_states[layer][pick]
        others = [states[pick] for k, states in enumerate(candidate_states) if k != layer]
        assert all(not torch.equal(memory, other) for other in others)


def test_changing_candidates_changes_positions(data):
    # Unpersonalised, so that positions see the request only through cross-attention.
    batch = data["train"][0]
    model = generator(data["space"], personalised=False).eval()
    other = dataclasses.replace(batch, cand_cat=batch.cand_cat.roll(1, dims=0),
                                cand_num=batch.cand_num.roll(1, dims=0))
    with torch.no_grad():
        first, second = model(batch).position_repr, model(other).position_repr
    assert (first - second).abs().amax(dim=(1, 2)).min() > 1e-4      # every request differs
    with torch.no_grad():
        torch.testing.assert_close(model(batch).position_repr, first)  # deterministic in eval


@pytest.mark.parametrize("objective,conditioning,interaction", [
    ("unlikelihood", "add", False), ("unlikelihood", "token", False),
    ("likelihood", "add", False), ("unlikelihood", "add", True)])
def test_generator_loss_is_finite_and_reaches_every_parameter(data, objective, conditioning,
                                                              interaction):
    space = data["space"]
    batch = data["train"][0]
    rows = ragged(batch, [60, 10, 3, 1])
    batch = dataclasses.replace(
        batch, **{k: torch.cat([getattr(rows, k), getattr(batch, k)[4:]])
                  for k in ("cand_mask", "cand_cat", "cand_num", "upstream_score", "exposed",
                            "exposed_mask", "feedback")})
    utility = utility_of_feedback(batch.feedback, space.utility_weights, batch.exposed_mask)
    model = generator(space, objective=objective, user_conditioning=conditioning,
                      user_interaction=interaction, tau=float(utility.median()))
    loss = generator_loss(model(batch), batch, model.config, space.utility_weights)
    assert 0 < float(loss.positive_fraction) <= 1
    for term in (loss.total, loss.sequence, loss.item, loss.position):
        assert torch.isfinite(term)
    loss.total.backward()
    silent = [name for name, p in model.named_parameters()
              if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert silent == []


def test_generator_loss_needs_tau(data):
    batch = data["train"][0]
    model = generator(data["space"])
    with pytest.raises(ValueError, match="tau"):
        generator_loss(model(batch), batch, model.config, data["space"].utility_weights)


def test_log_probs_match_the_probability_matrix(data):
    batch = ragged(data["train"][0], [60, 10, 3, 2])
    with torch.no_grad():
        out = generator(data["space"]).eval()(batch)
    log_p, log_not_p = exposed_log_probs(out, batch.exposed)
    p = out.probs.gather(1, batch.exposed.unsqueeze(1)).squeeze(1)           # (B, M)
    torch.testing.assert_close(log_p.exp(), p)
    torch.testing.assert_close(log_not_p.exp(), 1 - p)


def test_unlikelihood_is_safe_when_p_is_one():
    logits = torch.tensor([[[60.0], [0.0]]])                                   # (1, 2, 1)
    logits.requires_grad_(True)
    out = type("Out", (), {"logits": logits, "cand_mask": torch.ones(1, 2, dtype=torch.bool)})
    loss = unlikelihood_loss(out, torch.zeros(1, 1, dtype=torch.long),
                             torch.ones(1, 1, dtype=torch.bool), torch.zeros(1), tau=1.0)
    loss.backward()
    assert torch.isclose(loss, torch.tensor(60.0)) and torch.isfinite(logits.grad).all()


def mean_exposed_log_prob(model, batch) -> float:
    with torch.no_grad():
        log_p, _ = exposed_log_probs(model.eval()(batch), batch.exposed)
    return float(log_p[batch.exposed_mask].mean())


@pytest.mark.parametrize("negative", [True, False])
def test_unlikelihood_pushes_negative_lists_down_and_positive_lists_up(data, negative):
    batch = ragged(data["train"][1], [60] * 16)
    model = generator(data["space"], dropout=0.0)
    before = mean_exposed_log_prob(model, batch)
    utility = utility_of_feedback(batch.feedback, data["space"].utility_weights,
                                  batch.exposed_mask)
    tau = math.inf if negative else -math.inf
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(10):
        optimiser.zero_grad()
        unlikelihood_loss(model(batch), batch.exposed, batch.exposed_mask, utility,
                          tau).backward()
        optimiser.step()
    after = mean_exposed_log_prob(model, batch)
    assert (after < before - 1.0) if negative else (after > before + 0.3), (before, after)


def test_contrastive_loss_on_orthogonal_and_identical_representations():
    orthogonal = torch.eye(4).unsqueeze(0) * torch.tensor([1.0, 2.0, 0.5, 3.0])[:, None]
    for rho in (-0.5, 0.0, 0.5, 1.0):
        assert contrastive_loss(orthogonal, None, rho) == 0
    identical = torch.ones(2, 5, 8)
    for rho in (0.1, 0.5, 1.0):
        torch.testing.assert_close(contrastive_loss(identical, None, rho), torch.tensor(rho))
    # A padded entry identical to a real one is ignored; a request with one real entry too.
    padded = torch.cat([orthogonal, orthogonal[:, :1]], dim=1)                # (1, 5, 4)
    mask = torch.tensor([[True, True, True, True, False]])
    assert contrastive_loss(padded, mask, 0.5) == 0
    lonely = torch.tensor([[True, False, False, False, False]])
    both = contrastive_loss(torch.cat([padded, padded]), torch.cat([mask, lonely]), 0.5)
    assert both == 0


def test_utility_and_threshold(data):
    space = data["space"]
    batch = data["train"][0]
    utility = utility_of_feedback(batch.feedback, space.utility_weights, batch.exposed_mask)
    manual = [sum(float(batch.feedback[b, j] @ space.utility_weights)
                  for j in range(batch.exposed.shape[1]) if batch.exposed_mask[b, j])
              for b in range(len(batch))]
    torch.testing.assert_close(utility, torch.tensor(manual))
    everything = torch.cat([utility_of_feedback(b.feedback, space.utility_weights,
                                                b.exposed_mask) for b in data["train"]])
    tau = utility_threshold(data["train"], space.utility_weights, 0.3)
    assert tau == pytest.approx(float(torch.quantile(everything.double(), 0.3)))
    config = resolve_tau(NAR4RecConfig(tau_quantile=0.3), RequestLoader(
        [data["out"] / "train.parquet"], space, batch_size=500))
    assert config.tau == pytest.approx(tau)
    assert resolve_tau(NAR4RecConfig(tau=2.0), None).tau == 2.0


def test_config_reads_tau_from_text_and_checks_choices():
    assert NAR4RecConfig(tau="3.5").tau == 3.5
    with pytest.raises(ValueError, match="user_conditioning"):
        NAR4RecConfig(user_conditioning="concat")
    with pytest.raises(ValueError, match="heads"):
        NAR4RecConfig(d_model=30, heads=4)


def test_evaluator_scores_many_lists_as_it_scores_each(data):
    space = data["space"]
    batch = data["train"][0]
    torch.manual_seed(0)
    model = Evaluator(EvaluatorConfig(d_model=16, heads=2, layers=2, embedding_dim=8),
                      space).eval()
    lists = torch.stack([torch.stack([torch.randperm(60)[:6] for _ in range(16)])
                         for _ in range(len(batch))])                          # (B, 16, 6)
    list_mask = torch.ones_like(lists, dtype=torch.bool)
    list_mask[:, 3, 4:] = False                                                # a short list
    with torch.no_grad():
        together = model(batch, lists, list_mask)                              # (B, 16, 6, K)
        alone = torch.cat([model(batch, lists[:, k:k + 1], list_mask[:, k:k + 1])
                           for k in range(16)], dim=1)
        logged = model(batch)                                                  # (B, 6, K)
        as_list = model(batch, batch.exposed[:, None], batch.exposed_mask[:, None])[:, 0]
        short = model(batch, lists[:, 3:4, :4])[:, 0]
    assert together.shape == (len(batch), 16, 6, len(space.behaviours))
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logged, as_list)
    torch.testing.assert_close(together[:, 3, :4], short, atol=1e-5, rtol=1e-5)
    utility = predicted_list_utility(together, space.utility_weights, list_mask)
    assert utility.shape == (len(batch), 16) and (utility >= 0).all()


@pytest.mark.parametrize("interaction", [False, True])
def test_evaluator_loss_is_finite_and_reaches_every_parameter(data, interaction):
    batch = data["train"][0]
    torch.manual_seed(0)
    model = Evaluator(EvaluatorConfig(d_model=16, heads=2, embedding_dim=8,
                                      user_interaction=interaction), data["space"])
    loss = evaluator_loss(model(batch), batch.feedback, batch.exposed_mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_evaluator_beats_the_constant_predictor(data):
    space = data["space"]
    torch.manual_seed(0)
    model = Evaluator(EvaluatorConfig(d_model=32, embedding_dim=8, dropout=0.0), space)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    train = data["train"]
    model.train()
    for step in range(150):
        batch = train[step % len(train)]
        optimiser.zero_grad()
        evaluator_loss(model(batch), batch.feedback, batch.exposed_mask).backward()
        optimiser.step()
    # The best constant: each behaviour's training rate.
    cells = torch.cat([b.feedback[b.exposed_mask] for b in train])                # (C, K)
    rate = cells.mean(0).clamp(1e-6, 1 - 1e-6)
    valid = data["valid"][0]
    constant = torch.logit(rate).expand_as(valid.feedback)
    model.eval()
    with torch.no_grad():
        learned = evaluator_loss(model(valid), valid.feedback, valid.exposed_mask)
    baseline = evaluator_loss(constant, valid.feedback, valid.exposed_mask)
    assert learned < baseline - 0.01, (float(learned), float(baseline))


def test_generator_likelihood_training_beats_uniform(data):
    space = data["space"]
    model = generator(space, objective="likelihood", dropout=0.0)
    valid = data["valid"][0]
    untrained = mean_exposed_log_prob(model, valid)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    train = data["train"]
    for step in range(100):
        batch = train[step % len(train)]
        model.train()
        optimiser.zero_grad()
        generator_loss(model(batch), batch, model.config, space.utility_weights).total.backward()
        optimiser.step()
    learned = mean_exposed_log_prob(model, valid)
    n = valid.cand_mask.sum(1, keepdim=True).expand_as(valid.exposed)            # (B, M)
    uniform = float(-n[valid.exposed_mask].float().log().mean())
    assert learned > uniform + 0.4 and learned > untrained + 0.2, (learned, untrained, uniform)
    with torch.no_grad():
        loss = likelihood_loss(model(valid), valid.exposed, valid.exposed_mask)
    cells = int(valid.exposed_mask.sum())
    assert float(loss) == pytest.approx(-learned * cells / len(valid), rel=1e-4)


@pytest.mark.parametrize("cross", [False, True])
def test_attend_equals_multihead_attention(cross):
    """`layers.attend` is nn.MultiheadAttention's computation with its own parameters."""
    from nar4rec.models.layers import attend, key_padding_bias

    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    query = torch.randn(5, 6, 16)
    memory = torch.randn(5, 9, 16) if cross else query
    padding = torch.zeros(5, memory.shape[1], dtype=torch.bool)
    padding[1, 4:] = True
    padding[3, 1:] = True
    expected = module(query, memory, memory, key_padding_mask=padding, need_weights=False)[0]
    ours = attend(module, query, memory, key_padding_bias(padding, query.dtype))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(module, query, memory),
                               module(query, memory, memory, need_weights=False)[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keys", [5, 40])
def test_attend_over_few_keys_equals_the_fused_kernel(keys):
    """Short key sequences take `attend`'s explicit path, long ones the fused kernel; both
    give nn.MultiheadAttention's result, with a per-query bias (causal) too."""
    from nar4rec.models.layers import FEW_KEYS, attend, key_padding_bias

    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(3, keys, 16)
    padding = torch.zeros(3, keys, dtype=torch.bool)
    padding[1, 2:] = True
    causal = torch.triu(torch.ones(keys, keys, dtype=torch.bool), diagonal=1)
    bias = key_padding_bias(padding, x.dtype)[:, None, :] + key_padding_bias(causal, x.dtype)
    expected = module(x, x, x, attn_mask=bias.repeat_interleave(4, dim=0),
                      need_weights=False)[0]
    assert (keys <= FEW_KEYS) == (keys == 5)
    torch.testing.assert_close(attend(module, x, x, bias), expected, atol=1e-5, rtol=1e-5)


def test_evaluator_scores_lists_longer_than_its_position_table(data):
    batch = data["train"][0]                                        # logged lists of 6
    evaluator = Evaluator(EvaluatorConfig(**{**SMALL, "list_length": 4}), data["space"]).eval()
    with torch.no_grad():
        logits = evaluator(batch)
    assert logits.shape[:2] == batch.exposed.shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("causal", [False, True])
def test_causal_evaluator_reads_only_the_items_above(data, causal):
    """With `causal`, changing the last item of a list leaves every prediction above it
    unchanged; plain self-attention lets it change them."""
    batch = data["train"][0]
    torch.manual_seed(0)
    evaluator = Evaluator(EvaluatorConfig(**SMALL, causal=causal), data["space"]).eval()
    lists = torch.arange(6).expand(len(batch), 1, 6).clone()                  # (B, 1, 6)
    changed = lists.clone()
    changed[:, :, -1] = 40
    with torch.no_grad():
        before, after = evaluator(batch, lists), evaluator(batch, changed)
    above = (after[:, :, :-1] - before[:, :, :-1]).abs().max()
    assert (above < 1e-6) if causal else (above > 1e-4), float(above)
    assert (after[:, :, -1] - before[:, :, -1]).abs().max() > 1e-4


def test_redundancy_figures_read_only_the_items_above():
    """With an identity output layer the module returns its figures: per head the largest
    clipped cosine to an item above, per compared feature whether an item above shares a
    known value; nothing for the first item, nothing from padded items."""
    torch.manual_seed(0)
    heads, features = 2, 2                                  # categorical: id, topic, author
    module = Redundancy(heads + features, heads, 3, features)
    with torch.no_grad():
        module.out.weight.copy_(torch.eye(heads + features))
        module.out.bias.zero_()
    items = torch.randn(1, 5, heads + features)
    # topics 5, 6, 5, unknown, 6 (item 4 is padding); authors 7, 7, 8, 9, 8
    categorical = torch.tensor([[[2, 5, 7], [3, 6, 7], [4, 5, 8], [5, 1, 9], [6, 6, 8]]])
    mask = torch.tensor([[True, True, True, True, False]])
    with torch.no_grad():
        figures = module(items, categorical, mask)[0]                  # (5, H + F)
        z = module.project(items[0]).view(5, heads, 3)
        cosine = torch.nn.functional.cosine_similarity(z[:, None], z[None, :], dim=-1)
    assert torch.equal(figures[0], torch.zeros(heads + features))
    for k in range(1, 5):
        expected = cosine[k, :min(k, 4)].clamp_min(0).amax(0)         # (H,) items above
        torch.testing.assert_close(figures[k, :heads], expected)
    assert figures[:, heads].tolist() == [0, 0, 1, 0, 1]      # topic: 5 again; unknown never
    assert figures[:, heads + 1].tolist() == [0, 1, 0, 0, 1]  # author: 7 again, 8 again
    pairwise = module.pairwise(items, categorical)[0]                  # (5, 5)
    torch.testing.assert_close(pairwise, pairwise.T)
    assert pairwise.min() >= 0 and pairwise.max() <= 1 + 1e-6
    same = (categorical[0, :, None, 1:] == categorical[0, None, :, 1:]) & (
        categorical[0, :, None, 1:] >= 2)
    expected = (cosine.clamp_min(0).sum(-1) + same.sum(-1)) / (heads + features)
    torch.testing.assert_close(pairwise, expected)


@pytest.mark.parametrize("heads,shared", [(2, False), (0, True), (2, True)])
def test_evaluator_with_redundancy_trains_every_parameter_and_stays_causal(data, heads,
                                                                           shared):
    batch = data["train"][0]
    torch.manual_seed(0)
    model = Evaluator(EvaluatorConfig(**SMALL, causal=True, similarity_heads=heads,
                                      shared_values=shared), data["space"])
    loss = evaluator_loss(model(batch), batch.feedback, batch.exposed_mask)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    lists = torch.arange(6).expand(len(batch), 1, 6).clone()
    changed = lists.clone()
    changed[:, :, -1] = 40
    with torch.no_grad():
        before, after = model.eval()(batch, lists), model(batch, changed)
        single = model(batch, lists[:, :, :1])
    assert (after[:, :, :-1] - before[:, :, :-1]).abs().max() < 1e-6
    torch.testing.assert_close(single[:, :, 0], before[:, :, 0], atol=1e-5, rtol=1e-5)
    similarity = model.candidate_similarity(batch)
    n = batch.cand_mask.shape[1]
    assert similarity.shape == (len(batch), n, n)
    torch.testing.assert_close(similarity, similarity.transpose(1, 2))


def test_list_log_probs_of_several_lists(data):
    batch = ragged(data["train"][0], [60, 10, 3, 2])
    with torch.no_grad():
        out = generator(data["space"]).eval()(batch)
    lists = torch.stack([batch.exposed, batch.exposed.flip(1)], dim=1)        # (B, 2, 6)
    log_p, log_not_p = list_log_probs(out, lists)
    for k in range(2):
        p = out.probs.gather(1, lists[:, k].unsqueeze(1)).squeeze(1)            # (B, 6)
        torch.testing.assert_close(log_p[:, k].exp(), p)
        torch.testing.assert_close(log_not_p[:, k].exp(), 1 - p)


class FavoursLowIndices(torch.nn.Module):
    """A stand-in evaluator: every behaviour's logit falls with the candidate index, so a
    list of low-index candidates has the highest utility; relaxed lists are judged by their
    expected index, differentiably."""

    def forward(self, batch, lists, mask):
        return (-0.2 * lists.float())[..., None].expand(*lists.shape, batch.feedback.shape[-1])

    def forward_relaxed(self, batch, choice, lists):
        index = torch.arange(choice.shape[1], dtype=choice.dtype)
        expected = torch.einsum("bnm,n->bm", choice, index)                       # (B, m)
        return (-0.2 * expected)[..., None].expand(*expected.shape, batch.feedback.shape[-1])


def train_towards_the_judge(data, loss_of) -> tuple[float, float, list[float]]:
    """30 Adam steps of `loss_of(model, batch)` -> (the mean index of the greedy list's first
    item before, after, the second value `loss_of` returns at each step)."""
    batch = ragged(data["train"][1], [60] * 16)
    model = generator(data["space"], dropout=0.0)

    def greedy_index() -> float:
        with torch.no_grad():
            out = model.eval()(batch)
        return float(out.probs[:, :, 0].argmax(1).float().mean())

    before = greedy_index()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    seconds = []
    for _ in range(30):
        model.train()
        optimiser.zero_grad()
        loss, second = loss_of(model, batch)
        loss.backward()
        optimiser.step()
        seconds.append(float(second))
    return before, greedy_index(), seconds


def test_gumbel_consistency_training_moves_the_generator_towards_the_evaluators_choice(data):
    weights = data["space"].utility_weights
    for hard in (True, False):
        config = NAR4RecConfig(**SMALL, gumbel_weight=1.0, gumbel_hard=hard)
        before, after, utilities = train_towards_the_judge(
            data, lambda model, batch, config=config: consistency_loss(
                model(batch), batch, FavoursLowIndices(), weights, config))
        assert after < before - 5, (hard, before, after)
        assert utilities[-1] > utilities[0]          # the judge likes the relaxed lists more


def test_preference_training_moves_the_generator_towards_the_evaluators_choice(data):
    weights = data["space"].utility_weights
    config = NAR4RecConfig(**SMALL, preference_lists=8, preference_beta=1.0)
    before, after, paired = train_towards_the_judge(
        data, lambda model, batch: preference_loss(model(batch), batch, FavoursLowIndices(),
                                                   weights, config))
    assert after < before - 5, (before, after)
    assert paired[0] == 1.0                          # sampled lists differ from the greedy one
    batch = ragged(data["train"][1], [60] * 4)
    strict = dataclasses.replace(config, preference_margin=1e9)   # no gap that large: no pair
    loss, share = preference_loss(generator(data["space"])(batch), batch, FavoursLowIndices(),
                                  weights, strict)
    assert float(loss.detach()) == 0.0 and float(share) == 0.0


def test_a_straight_through_list_is_judged_as_the_hard_list(data):
    """`Evaluator.forward_relaxed` with one-hot rows is `forward` on the list itself, and its
    gradient reaches the choice weights."""
    batch = ragged(data["train"][0], [60, 10, 3, 2])
    torch.manual_seed(0)
    model = Evaluator(EvaluatorConfig(d_model=16, heads=2, layers=2, embedding_dim=8,
                                      similarity_heads=2, shared_values=True, causal=True),
                      data["space"]).eval()
    lists = batch.exposed.masked_fill(~batch.exposed_mask, -1)
    lists[2, 3:] = -1                                            # a request with 3 candidates
    n = batch.cand_mask.shape[1]
    choice = torch.nn.functional.one_hot(lists.clamp_min(0), n).transpose(1, 2).float()
    choice = (choice * (lists >= 0).unsqueeze(1)).requires_grad_(True)
    relaxed = model.forward_relaxed(batch, choice, lists)
    hard = model(batch, lists.unsqueeze(1), (lists >= 0).unsqueeze(1))[:, 0]
    real = lists >= 0
    torch.testing.assert_close(relaxed[real], hard[real], atol=1e-5, rtol=1e-5)
    relaxed[real].sum().backward()
    assert choice.grad.abs().sum() > 0


def test_self_critical_training_moves_the_generator_towards_the_evaluators_choice(data):
    weights = data["space"].utility_weights
    before, after, shares = train_towards_the_judge(
        data, lambda model, batch: self_critical_loss(model(batch), batch, FavoursLowIndices(),
                                                      weights, count=8))
    assert 0 < shares[0] < 1                 # some samples beat the greedy list, some do not
    assert after < before - 5, (before, after)


def test_generator_loss_with_evaluator_lists(data):
    batch = data["train"][0]
    model = generator(data["space"], evaluator_lists=4, tau=1.0)
    weights = data["space"].utility_weights
    with pytest.raises(ValueError, match="evaluator"):
        generator_loss(model(batch), batch, model.config, weights)
    seeded = [generator_loss(model(batch), batch, model.config, weights, FavoursLowIndices(),
                             torch.Generator().manual_seed(0)) for _ in range(2)]
    plain = generator_loss(model(batch), batch, dataclasses.replace(model.config,
                                                                    evaluator_lists=0), weights)
    assert float(seeded[0].sampled.detach()) > 0 and float(plain.sampled) == 0
    assert float(seeded[0].total.detach()) == float(seeded[1].total.detach())   # same draws
    torch.testing.assert_close(seeded[0].total - seeded[0].sampled, plain.total)


def test_generator_loss_adds_the_evaluator_judged_terms(data):
    batch = data["train"][0]
    model = generator(data["space"], tau=1.0, gumbel_weight=0.5, preference_lists=4,
                      preference_weight=2.0)
    weights = data["space"].utility_weights
    with pytest.raises(ValueError, match="evaluator"):
        generator_loss(model(batch), batch, model.config, weights)
    out = model(batch)
    terms = generator_loss(out, batch, model.config, weights, FavoursLowIndices(),
                           torch.Generator().manual_seed(0))
    plain = generator_loss(out, batch, dataclasses.replace(
        model.config, gumbel_weight=0.0, preference_lists=0), weights)
    assert float(terms.consistency.detach()) != 0 and 0 < float(terms.preference_pairs) <= 1
    torch.testing.assert_close(terms.total - 0.5 * terms.consistency - 2.0 * terms.preference,
                               plain.total)
    with pytest.raises(ValueError, match="gumbel_objective"):
        NAR4RecConfig(gumbel_objective="hinge")


def test_evaluator_step_adds_the_loss_of_every_logged_item_alone(data):
    from nar4rec.reranker import evaluator_step

    batch = data["train"][0]
    torch.manual_seed(0)
    config = EvaluatorConfig(d_model=16, heads=2, embedding_dim=8, causal=False, alone_weight=0.5)
    model = Evaluator(config, data["space"]).eval()
    with torch.no_grad():
        loss, logs = evaluator_step(config)(model, batch)
        in_context = evaluator_loss(model(batch), batch.feedback, batch.exposed_mask)
        singles = batch.exposed.unsqueeze(-1)                                   # (B, M, 1)
        alone = model(batch, singles, singles >= 0)[:, :, 0]                    # (B, M, K)
        alone = evaluator_loss(alone, batch.feedback, batch.exposed_mask)
        plain, plain_logs = evaluator_step(dataclasses.replace(config, alone_weight=0.0))(
            model, batch)
    assert logs["in_context"] == pytest.approx(float(in_context), abs=1e-5)
    assert logs["alone"] == pytest.approx(float(alone), abs=1e-5)
    assert float(loss) == pytest.approx(float(in_context + 0.5 * alone), abs=1e-5)
    assert float(plain) == pytest.approx(float(in_context), abs=1e-6)
    assert set(plain_logs) == {"loss"}


def test_training_items_alone_makes_the_item_wise_scores_better_predictions(data):
    """The item-alone loss teaches what item_wise_scores read: the logged items' feedback
    predicted from each item alone, on the validation split."""
    from nar4rec.reranker import evaluator_step

    def alone_loss(weight: float) -> float:
        config = EvaluatorConfig(d_model=16, heads=2, embedding_dim=8, alone_weight=weight)
        torch.manual_seed(0)
        model = Evaluator(config, data["space"])
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        step = evaluator_step(config)
        for index in range(120):
            optimiser.zero_grad()
            step(model, data["train"][index % len(data["train"])])[0].backward()
            optimiser.step()
        model.eval()
        valid = data["valid"][0]
        with torch.no_grad():
            singles = valid.exposed.unsqueeze(-1)
            logits = model(valid, singles, singles >= 0)[:, :, 0]
            return float(evaluator_loss(logits, valid.feedback, valid.exposed_mask))

    without, with_alone = alone_loss(0.0), alone_loss(1.0)
    assert with_alone < without - 0.005, (with_alone, without)


def test_evaluator_config_refuses_a_negative_alone_weight():
    with pytest.raises(ValueError, match="alone_weight"):
        EvaluatorConfig(alone_weight=-1)
