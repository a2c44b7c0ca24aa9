"""One typed configuration: YAML -> frozen dataclasses, validated on load.

Unknown keys, wrong types and invalid values are errors that name the dotted key (and the allowed
keys or values). Command-line overrides use the same dotted names: `algorithm.vespo.c1_pos=2.5`.
Sections are added here as the product grows; each section's dataclass validates itself.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

from .algo.advantages import AdvantageConfig
from .algo.kernel import KernelConstants
from .algo.kernel_control import KernelControlConfig
from .algo.policy_losses import (POLICY_LOSSES, BapoParams, CispoParams, ClipParams, GspoParams,
                                 SapoParams, SeqIsParams, ToprParams)
from .learner.learner import (LossSettings, OptimConfig, check_interleaved_microbatches,
                              check_learner_settings)
from .learner.model import ModelConfig, check_moe_layout
from .learner.train_config import TrainConfig
from .moe.replay import check_replay_mode
from .parallel.layout import ParallelLayout
from .rollout.source import RolloutConfig
from .slurm.config import SlurmConfig
from .tasks.registry import TaskConfig
from .tracking.mlflow_run import TrackingConfig


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key at fault."""


@dataclass(frozen=True)
class AlgorithmConfig:
    """The policy loss and its constants; one sub-section per registered loss."""

    loss: str = "vespo"
    vespo: KernelConstants = field(default_factory=KernelConstants)
    seq_is: SeqIsParams = field(default_factory=SeqIsParams)
    grpo: ClipParams = field(default_factory=ClipParams)
    gspo: GspoParams = field(default_factory=GspoParams)
    sapo: SapoParams = field(default_factory=SapoParams)
    cispo: CispoParams = field(default_factory=CispoParams)
    topr: ToprParams = field(default_factory=ToprParams)
    bapo: BapoParams = field(default_factory=BapoParams)
    # Take the importance ratio against the rollout engine's log-probs (log-space fold).
    correct_mismatch: bool = False
    # |log pi_old - log mu_engine| above this counts as an extreme token in mismatch/extreme_frac.
    mismatch_threshold: float = 1.0
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    # MoE routing replay: off | R2 (replay the old-policy forward's routes in training) | R3
    # (replay the rollout engine's routes, from each sample's routed_experts).
    routing_replay: str = "off"
    # MoE routing metrics in every step (moe/drift_*, moe/route_*, moe/router_kl, expert load);
    # MoE models with parallel.pp == 1 only.
    routing_metrics: bool = False
    # vespo_adaptive: c2 per advantage sign becomes a dual variable, stepped each optimizer step
    # toward E_Q[W] = budget (the constraint behind the variance bound); null: fixed constants.
    kernel_control: Optional[KernelControlConfig] = None

    def __post_init__(self) -> None:
        if self.loss not in POLICY_LOSSES:
            raise ValueError(f"loss={self.loss!r} is unknown; allowed: {sorted(POLICY_LOSSES)}")
        if self.kernel_control is not None and self.loss != "vespo":
            raise ValueError(f"kernel_control adapts the vespo kernel; loss is {self.loss!r}")
        check_replay_mode(self.routing_replay)

    @property
    def loss_params(self) -> Any:
        """The parameters of the selected loss (its sub-section)."""
        return getattr(self, self.loss)

    def loss_settings(self, logprob_chunk_tokens: int, temperature: float) -> LossSettings:
        """What the learner's loss path takes from this section, with the sampling temperature
        the behaviour policy's samples were drawn at."""
        return LossSettings(
            loss=self.loss, params=self.loss_params, correct_mismatch=self.correct_mismatch,
            mismatch_threshold=self.mismatch_threshold, logprob_chunk_tokens=logprob_chunk_tokens,
            routing_replay=self.routing_replay, routing_metrics=self.routing_metrics,
            temperature=temperature)


@dataclass(frozen=True)
class Config:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def loss_settings(self) -> LossSettings:
        """What the learner's loss path takes from the config: the algorithm section, the
        log-prob chunking, and the temperature the samples are drawn at (the learner's log pi and
        old log-probs are those of softmax(logits / T), as the engine's are)."""
        return self.algorithm.loss_settings(self.train.logprob_chunk_tokens,
                                            self.rollout.sampling.temperature)

    def __post_init__(self) -> None:
        if self.train.world_size % (self.parallel.tp * self.parallel.pp * self.parallel.cp):
            raise ValueError(f"train.world_size ({self.train.world_size}) must be divisible by "
                             f"parallel tp*pp*cp ({self.parallel.tp * self.parallel.pp * self.parallel.cp})")
        model, tp = self.model, self.parallel.tp
        for name in ("num_attention_heads", "num_key_value_heads"):
            if getattr(model, name) % tp:
                raise ValueError(f"parallel.tp ({tp}) must divide model.{name} "
                                 f"({getattr(model, name)}): each TP rank holds whole heads")
        dp = self.parallel.dp(self.train.world_size)
        if self.train.mini_batch_size < dp:
            raise ValueError(f"train: a mini-batch of {self.train.mini_batch_size} samples "
                             f"(rollout_batch_size / staleness) cannot feed {dp} data-parallel ranks")
        check_moe_layout(self.model, self.parallel)
        one_loss_call = (dp == 1 and self.parallel.cp == 1 and self.train.max_tokens_per_micro_batch
                         is None and self.train.micro_batch_size >= self.train.mini_batch_size)
        if self.algorithm.loss == "bapo" and not one_loss_call:
            raise ValueError("algorithm.loss=bapo chooses its clip bounds from the tokens of one "
                             "loss call, which is the whole step only with one data-parallel rank, "
                             "parallel.cp 1 and one micro-batch per step (train.micro_batch_size >= "
                             f"the mini-batch of {self.train.mini_batch_size}, no "
                             "max_tokens_per_micro_batch); otherwise each micro-batch share would "
                             "get bounds of its own")
        if self.rollout.sampling.temperature <= 0:
            raise ValueError("rollout.sampling.temperature must be > 0: training samples drawn "
                             "greedily (temperature 0) have no sampling distribution for the "
                             "importance weight W = pi / mu to refer to (evaluation is greedy on "
                             "its own)")
        check_learner_settings(self.model, self.parallel, self.loss_settings)
        if self.parallel.vpp and self.train.max_tokens_per_micro_batch is None:
            # (With a token budget the micro-batch count is rounded up to a multiple of pp when
            # the batch is cut: `batching.micro_batch_plan`.)
            # DP ranks get mini-batch shares differing by at most one sample
            # (`batching.rank_micro_batches`), hence up to two micro-batch counts.
            for share in {self.train.mini_batch_size // dp, -(-self.train.mini_batch_size // dp)}:
                check_interleaved_microbatches(-(-share // self.train.micro_batch_size),
                                               self.parallel.pp, self.parallel.pp)
        if self.train.heatmap_interval and not self.algorithm.routing_metrics:
            raise ValueError("train.heatmap_interval needs algorithm.routing_metrics=true")
        n = self.rollout.n_samples_per_prompt
        if self.train.mini_batch_size % n:
            raise ValueError(f"rollout.n_samples_per_prompt ({n}) must divide the mini-batch "
                             f"(train.rollout_batch_size / train.staleness = {self.train.mini_batch_size}): "
                             f"a prompt's responses are one advantage group")
        if self.train.mini_batch_size // n < dp:
            raise ValueError(f"train: a mini-batch of {self.train.mini_batch_size // n} prompts "
                             f"(rollout_batch_size / staleness / rollout.n_samples_per_prompt) "
                             f"cannot feed {dp} data-parallel ranks: a prompt's responses stay on "
                             f"one rank")
        if self.rollout.fleet.server.enable_routed_experts and not self.model.is_moe:
            raise ValueError("rollout.fleet.server.enable_routed_experts needs a MoE model.family")
        if (self.rollout.mode == "async" and self.train.old_logprobs == "recompute"
                and not self.algorithm.correct_mismatch):
            raise ValueError("rollout.mode=async recomputes old log-probs at the current policy, so "
                             "W would ignore the samples' staleness: set algorithm.correct_mismatch="
                             "true (W against the engine's log-probs) or train.old_logprobs=engine")
        if self.rollout.mode == "async" and self.train.staleness != 1:
            raise ValueError("train.staleness must be 1 with rollout.mode=async (each step takes one "
                             "mini-batch from the buffer; rollout.max_staleness bounds the lag)")
        if self.algorithm.routing_replay == "R2" and self.train.old_logprobs != "recompute":
            raise ValueError("algorithm.routing_replay=R2 replays the routes of the old-policy "
                             "forward: it needs train.old_logprobs=recompute")
        model = self.model
        outside = [t for t in self.rollout.sampling.stop_token_ids if t >= model.vocab_size]
        if outside:
            raise ValueError(f"rollout.sampling.stop_token_ids: {outside} outside the vocabulary "
                             f"[0, model.vocab_size={model.vocab_size})")
        for s in self.task.eval_sets:
            if (s.max_new_tokens or 0) >= model.max_position_embeddings:
                raise ValueError(f"task.eval_sets: {s.name!r} max_new_tokens ({s.max_new_tokens}) "
                                 f"leaves no room for a prompt in model.max_position_embeddings "
                                 f"({model.max_position_embeddings})")
        if self.rollout.sampling.max_new_tokens >= model.max_position_embeddings:
            raise ValueError(f"rollout.sampling.max_new_tokens ({self.rollout.sampling.max_new_tokens}) "
                             f"leaves no room for a prompt in model.max_position_embeddings "
                             f"({model.max_position_embeddings})")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is tuple:  # tuple[X, ...]: a YAML list (or one value, taken as a list of one)
        (inner, _) = typing.get_args(tp)
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(inner, v, f"{key}[{k}]") for k, v in enumerate(items))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads exponents without a dot (1e-6) as strings: accept any numeric string.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {tp!r}")


def build(cls: type, data: Any, key: str = "") -> Any:
    """Construct dataclass `cls` from a mapping, checking every key and value."""
    where = key or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for k in data:
        if k not in names:
            raise ConfigError(f"{key + '.' if key else ''}{k}: unknown key; allowed: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{key + '.' if key else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    dotted, raw = override.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw)


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (safe_load keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.name}:{key_node.start_mark.line + 1}: "
                                  f"key {key!r} given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Union[str, Path]) -> Any:
    """A YAML file's content; a syntax error or a duplicate key is one ConfigError naming the file
    and the line."""
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f":{where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None


def load_config(path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML file (or the defaults when `path` is None) and apply dotted overrides."""
    tree: dict = {}
    if path is not None:
        tree = read_yaml(path) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for override in overrides:
        _apply_override(tree, override)
    return build(Config, tree)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf of a config (what a run tracker logs as params)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for k, item in enumerate(value):  # task.eval_sets[0].name, ...
                out.update(flatten(item, f"{key}[{k}]."))
        else:
            out[key] = value
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_config(config: Config) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal Config."""
    return yaml.safe_dump(_plain(config), sort_keys=False)
