"""The task section of a run's configuration, and the registry that builds a Task from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .base import Task
from .eval_sets import EvalSetConfig, check_unique_names
from .math_task import MathRewardConfig, MathTask
from .prompt_data import PromptDataConfig
from .synthetic import SyntheticConfig, SyntheticTask


@dataclass(frozen=True)
class TaskConfig:
    """Which task, and its settings.

    name: "synthetic" (the built-in character task, for the embedded default and tests) or "math"
    (prompts from data.path, \\boxed-answer reward). seed: prompt order / generation. eval_sets:
    the evaluation sets (name, file, k, sampling; tasks/eval_sets.py). Without any, one greedy set
    "heldout" of eval_size prompts (synthetic: generated; math: the first usable ones of
    data.eval_path, when set). data: the prompt files (math only). synthetic / math: each task's
    own options.
    """

    name: str = "synthetic"
    # The policy's tokenizer (a HF directory); None: the tiny built-in one for "synthetic", the
    # initial HF checkpoint's for "math".
    tokenizer_path: Optional[str] = None
    seed: int = 0
    eval_size: int = 64
    eval_sets: tuple[EvalSetConfig, ...] = ()
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    math: MathRewardConfig = field(default_factory=MathRewardConfig)

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"name={self.name!r} is unknown; allowed: {sorted(TASKS)}")
        if self.eval_size < 0:
            raise ValueError(f"eval_size must be >= 0, got {self.eval_size}")
        if self.name == "math" and self.data.path is None:
            raise ValueError("data.path is required for name='math' (a .jsonl or .parquet file)")
        check_unique_names(self.eval_sets)
        for s in self.eval_sets:
            if self.name == "math" and s.path is None:
                raise ValueError(f"eval_sets: {s.name!r} needs a path (a .jsonl or .parquet file)")
            if self.name == "synthetic" and s.path is not None:
                raise ValueError(f"eval_sets: {s.name!r} has a path, but the synthetic task "
                                 f"generates its held-out prompts (leave path out)")

    @property
    def resolved_eval_sets(self) -> tuple[EvalSetConfig, ...]:
        """eval_sets, or the default greedy "heldout" set (none when there is nothing to hold out)."""
        if self.eval_sets or self.eval_size == 0:
            return self.eval_sets
        if self.name == "synthetic":
            return (EvalSetConfig("heldout"),)
        if self.data.eval_path is not None:
            return (EvalSetConfig("heldout", self.data.eval_path, limit=self.eval_size),)
        return ()


def _synthetic(config: TaskConfig, tokenizer: Any) -> Task:
    return SyntheticTask(tokenizer, config.synthetic, config.seed, config.eval_size,
                         config.resolved_eval_sets)


def _math(config: TaskConfig, tokenizer: Any) -> Task:
    return MathTask(tokenizer, config.data, config.math, config.seed, config.resolved_eval_sets)


TASKS: dict[str, Callable[[TaskConfig, Any], Task]] = {"synthetic": _synthetic, "math": _math}


def build_task(config: TaskConfig, tokenizer: Any) -> Task:
    """The task named by config.name, over `tokenizer` (a transformers tokenizer of the policy)."""
    return TASKS[config.name](config, tokenizer)


def load_tokenizer(config: TaskConfig, checkpoint: Optional[str]) -> Any:
    """The tokenizer prompts are encoded and responses decoded with (see TaskConfig.tokenizer_path)."""
    path = config.tokenizer_path or (checkpoint if config.name != "synthetic" else None)
    if path is None:
        if config.name != "synthetic":
            raise ValueError(f"task.tokenizer_path is required for task {config.name!r} when "
                             f"train.init_hf_checkpoint is not set")
        from .tiny_tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
