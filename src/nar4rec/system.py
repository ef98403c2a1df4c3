"""One interface for every reranking system, from training to serving.

A system is what a run directory holds: the modules of its training phases (NAR4Rec: the
evaluator, then the generator; a baseline: its one model) and what turns them into lists. The
training loop of `runs.train_run`, evaluation, `compare`, `bench`, `export` and `serve` call
only what this class declares, and find a model's class through `registry.system_class`:

    phases                          the modules it trains, in order (`Phase`)
    phase_config / build / loss     what training a phase needs: the module's settings (with
                                    anything fitted on the training split), the module, and
                                    its loss function for `train.train`
    rerank(batch) -> Reranked       the lists it shows, each placed item's score and each
                                    list's predicted utility: what serving and `rerank` return
    evaluate(batch) -> Ranking, {}  the lists and the candidate scores the offline metrics
                                    rank, and its other lists (Table 7's decoders)
    logged_click(batch)             its click probability of every logged item (Table 2)
    predict_feedback(batch, lists)  each behaviour's probability at each position of any
                                    lists: the reward model of off-policy evaluation (those
                                    with a calibrated per-behaviour model only)
    training_step()                 the module it trains last and its loss (Table 4)
    inference_calls()               the calls `bench` times, the system's own `rerank` first
    graphs()                        what `export` writes: "system" (the six feature inputs to
                                    the lists, scores and utility that `rerank` returns) and
                                    any other graph worth serving
    companions(config)              other runs `compare` trains beside it (`Companion`:
                                    NAR4Rec at the paper's settings, Table 6's vanilla)

Nothing here loops over requests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from nar4rec.data.batch import RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.errors import Nar4recError

if TYPE_CHECKING:
    from nar4rec.models.base import Ranking
    from nar4rec.train import LossFn

FEATURE_INPUTS = ("user_cat", "user_num", "cand_cat", "cand_num", "upstream_score", "cand_mask")
SYSTEM_OUTPUTS = ("list", "item_scores", "utility")


@dataclass(frozen=True)
class Companion:
    """A run `compare` trains beside a system's own, for each seed.

    config: its settings (the system's `RunConfig` with some changed).
    reuse: phases it takes, trained, from another run of the same seed ({phase: that run's
        name}: the system's own name or an earlier companion's) instead of training them.
    row: whether the tables show it as a model of its own (otherwise only where its system's
        TABLE6 names it).
    """

    config: Any
    reuse: dict[str, str] = dataclasses.field(default_factory=dict)
    row: bool = False


@dataclass(frozen=True)
class Phase:
    """One module of a system, trained by the one loop into RUN/<name>/.

    name: its folder in the run directory and its key in run.json's "phases".
    section: the RunConfig table of the module's own settings.
    train: the RunConfig table of its training settings (a `TrainConfig`).
    """

    name: str
    section: str
    train: str


@dataclass
class Reranked:
    """A system's answer for B requests.

    lists: (B, m) candidate indices in the order to show them, NO_ITEM (-1) past the end of a
        request with fewer than m candidates.
    utility: (B,) the system's predicted utility of each returned list (nan where it has no
        such prediction).
    item_scores: (B, m) each placed item's score, in list order (0 past the end): its
        predicted utility in the list where the system predicts one, else its own score.
    proposals: (B, K, m) every list the system considered (K = 1 for a single list); chosen:
        (B,) which one it returned.
    """

    lists: torch.Tensor
    utility: torch.Tensor
    item_scores: torch.Tensor
    proposals: torch.Tensor
    chosen: torch.Tensor

    @classmethod
    def single(cls, lists: torch.Tensor, item_scores: torch.Tensor,
               utility: torch.Tensor | None = None) -> Reranked:
        """One list per request (no proposals to choose from); item scores zeroed past the
        end, utility nan unless given."""
        placed = lists >= 0
        if utility is None:
            utility = torch.full((len(lists),), torch.nan, device=lists.device)
        return cls(lists, utility, item_scores.masked_fill(~placed, 0.0), lists.unsqueeze(1),
                   torch.zeros(len(lists), dtype=torch.long, device=lists.device))


def batch_of(user_cat, user_num, cand_cat, cand_num, upstream_score,
             cand_mask) -> RequestBatch:
    """A RequestBatch holding only what the models' forward passes read (the inputs of an
    exported graph)."""
    return RequestBatch(request_id=None, user_id=None, item_id=None, user_cat=user_cat,
                        user_num=user_num, cand_cat=cand_cat, cand_num=cand_num,
                        upstream_score=upstream_score, cand_mask=cand_mask, exposed=None,
                        exposed_mask=None, feedback=None, log_propensity=None)


class SystemGraph(nn.Module):
    """A system's `rerank` with plain tensor inputs, for the ONNX exporter: the six feature
    inputs -> (list (B, m), item_scores (B, m), utility (B,))."""

    def __init__(self, system: System):
        super().__init__()
        self.system = system
        for name, module in system.modules.items():    # registered, so export sees weights
            self.add_module(name, module)

    def forward(self, user_cat, user_num, cand_cat, cand_num, upstream_score, cand_mask):
        out = self.system.rerank(batch_of(user_cat, user_num, cand_cat, cand_num,
                                          upstream_score, cand_mask))
        return out.lists, out.item_scores, out.utility


@dataclass
class Graph:
    """A module to export: its inputs (names of `export.example_inputs`) and output names."""

    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class System:
    """Base class of every reranking system (see the module docstring).

    Args:
        modules: the module of each phase, by phase name, trained or not.
        config: the run's settings (a `runs.RunConfig`).
        space: the feature space the modules read.
        list_length: m, the length of the lists returned.
    """

    name: ClassVar[str] = ""                      # set by `registry.system_class`
    phases: ClassVar[tuple[Phase, ...]] = ()
    sections: ClassVar[tuple[str, ...]] = ()      # RunConfig tables a run records
    settable: ClassVar[tuple[str, ...]] = ()      # tables `--set` may change after training
    lists_name: ClassVar[str | None] = None       # evaluation's name for its lists (default:
    # the model's name)
    # `nar4rec compare`'s Table 6 (run name -> label: this system's runs, its companions
    # among them) and Table 7 (label -> the name of an `evaluate` variant); none by default
    TABLE6: ClassVar[dict[str, str]] = {}
    TABLE7: ClassVar[dict[str, str]] = {}

    def __init__(self, modules: dict[str, nn.Module], config: Any, space: FeatureSpace,
                 list_length: int):
        self.modules = {name: module.eval() for name, module in modules.items()}
        self.config = config
        self.space = space
        self.list_length = list_length
        self.weights = space.utility_weights.float()

    # -- training (class methods: the modules do not exist yet) ------------------------------

    @classmethod
    def phase_config(cls, phase: Phase, config: Any, train_paths, space: FeatureSpace) -> Any:
        """The settings `phase`'s module is built from: its table of `config`, with whatever
        the system fits on the training split (NAR4Rec's tau). Recorded in run.json."""
        return getattr(config, phase.section)

    @classmethod
    def build(cls, phase: Phase, model_config: Any, space: FeatureSpace) -> nn.Module:
        """`phase`'s untrained module."""
        raise NotImplementedError

    @classmethod
    def loss(cls, phase: Phase, model_config: Any, space: FeatureSpace,
             trained: Callable[[str], nn.Module]) -> LossFn:
        """`phase`'s loss function for `train.train`; `trained(name)` loads the module of an
        earlier phase, trained (for a loss judged by it)."""
        raise NotImplementedError

    @classmethod
    def untrained(cls, config: Any, space: FeatureSpace, list_length: int, *,
                  tau: float | None = None) -> System:
        """The system with freshly built modules at `config`'s settings (for benchmarks and
        plumbing tests: weights do not change the cost). `tau`: a threshold to use where a
        phase would fit one on the training split."""
        modules = {}
        for phase in cls.phases:
            model_config = dataclasses.replace(getattr(config, phase.section),
                                               list_length=list_length)
            if tau is not None and hasattr(model_config, "tau"):
                model_config = dataclasses.replace(model_config, tau=tau)
            modules[phase.name] = cls.build(phase, model_config, space)
        return cls(modules, config, space, list_length)

    @classmethod
    def companions(cls, config: Any) -> dict[str, Companion]:
        """Other runs `compare` trains beside this one at `config`, by name, in the order
        they are trained. None by default."""
        return {}

    # -- a system -------------------------------------------------------------------------

    def rerank(self, batch: RequestBatch) -> Reranked:
        raise NotImplementedError

    def evaluate(self, batch: RequestBatch, variants: bool = True
                 ) -> tuple[Ranking, dict[str, torch.Tensor]]:
        """The returned lists with the scores the offline metrics rank (`models.base.Ranking`)
        and, with `variants`, other lists of the same system by name (none by default)."""
        raise NotImplementedError

    def logged_click(self, batch: RequestBatch) -> torch.Tensor:
        """(B, M) the predicted probability of the first behaviour of each logged item, in its
        logged context."""
        raise NotImplementedError

    def predict_feedback(self, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
        """(B, m, K) the predicted probability of each behaviour at each position of `lists`
        (B, m) (NO_ITEM past a list's end: 0 there), in the list's context where the model
        has one: the reward model of `nar4rec ope`'s direct and doubly robust estimators.

        Raises Nar4recError for a system without a calibrated per-behaviour model."""
        raise Nar4recError(f"a {self.name} run has no per-behaviour click model to score "
                           "lists with; use a nar4rec, evaluator, dnn, dcn or edge_rerank run "
                           "as the reward model")

    def training_step(self) -> tuple[nn.Module, LossFn]:
        """The module of the last phase and its loss function (what `bench` times)."""
        phase = self.phases[-1]
        module = self.modules[phase.name]
        return module, self.loss(phase, module.config, self.space, self.modules.__getitem__)

    def inference_calls(self) -> dict[str, Callable[[RequestBatch], object]]:
        """Named calls from a batch to lists that `bench` times; the system's own `rerank`
        first, under the model's name."""
        return {self.name: self.rerank}

    def graphs(self) -> dict[str, Graph]:
        """What `export` writes, by name; "system" answers as `rerank` does."""
        return {"system": Graph(SystemGraph(self), FEATURE_INPUTS, SYSTEM_OUTPUTS)}

    @property
    def device(self) -> torch.device:
        return next(next(iter(self.modules.values())).parameters()).device

    def to(self, device: torch.device | str) -> System:
        """Moves every module and the utility weights to `device`; returns self."""
        for module in self.modules.values():
            module.to(device)
        self.weights = self.weights.to(device)
        return self

    @classmethod
    def check_settable(cls, sets: dict) -> None:
        """`--set` after training: only the tables of `settable`."""
        for key in sets:
            if key.split(".")[0] not in cls.settable:
                allowed = ", ".join(f"{t}.*" for t in cls.settable) or "none"
                raise Nar4recError(f"--set {key}: a {cls.name} run can change only these "
                                   f"settings after training: {allowed}")
