"""The math task for real runs: prompts from a dataset file, reward 1 for an equivalent \\boxed answer.

Reward of a response: decode the tokens before <eos>, take its last \\boxed{...}, normalise it and
the reference answer (math_answer), and compare (math_equivalence): 1.0 if equivalent, 0.0 if not,
and -no_box_penalty when the response has no (closed) box at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from .base import Prompt, cut_at_eos
from .cursor import EpochCursor
from .math_answer import last_boxed, normalize_answer
from .math_equivalence import SympyJudge, equivalent
from .prompt_data import PromptDataConfig, PromptDataset


@dataclass(frozen=True)
class MathRewardConfig:
    """no_box_penalty: a response without a \\boxed answer scores -no_box_penalty (0 = plain 0/1).
    rel_tol: relative tolerance for numeric equality. symbolic: try sympy when strings and numbers
    differ; sympy_timeout_s bounds one comparison; max_symbolic_chars skips longer answers."""

    no_box_penalty: float = 0.0
    rel_tol: float = 1e-6
    symbolic: bool = True
    sympy_timeout_s: float = 2.0
    max_symbolic_chars: int = 128

    def __post_init__(self) -> None:
        if not 0 <= self.no_box_penalty <= 1:
            raise ValueError(f"no_box_penalty must be in [0, 1], got {self.no_box_penalty}")
        if not 0 <= self.rel_tol < 1:
            raise ValueError(f"rel_tol must be in [0, 1), got {self.rel_tol}")
        if not self.sympy_timeout_s > 0:
            raise ValueError(f"sympy_timeout_s must be > 0, got {self.sympy_timeout_s}")
        if self.max_symbolic_chars < 1:
            raise ValueError(f"max_symbolic_chars must be >= 1, got {self.max_symbolic_chars}")


def math_reward(response: str, reference: str, config: MathRewardConfig,
                judge: Optional[SympyJudge]) -> float:
    """1.0 if the last \\boxed answer of `response` is equivalent to `reference`, else 0.0;
    -no_box_penalty if `response` has no box. `judge` None = no symbolic comparison."""
    boxed = last_boxed(response)
    if boxed is None:
        return -config.no_box_penalty
    same = equivalent(normalize_answer(boxed), normalize_answer(reference), config.rel_tol,
                      judge if config.symbolic else None)
    return 1.0 if same else 0.0


class MathTask:
    """Training prompts from `data.path` in a per-epoch shuffled order (group_id = number of prompts
    served before, so unique across epochs); eval prompts = the first eval_size usable prompts of
    data.eval_path (none without an eval_path)."""

    def __init__(self, tokenizer: Any, data: PromptDataConfig, reward_config: MathRewardConfig,
                 seed: int, eval_size: int):
        if data.path is None:
            raise ValueError("the math task needs data.path")
        self.tokenizer, self.reward_config = tokenizer, reward_config
        self.train = PromptDataset(data.path, tokenizer, data)
        self.eval = (PromptDataset(data.eval_path, tokenizer, data, limit=eval_size)
                     if data.eval_path is not None and eval_size > 0 else None)
        self.cursor = EpochCursor(len(self.train), seed, shuffle=data.shuffle)
        self.judge = SympyJudge(reward_config.sympy_timeout_s, reward_config.max_symbolic_chars)

    def train_prompts(self) -> Iterator[Prompt]:
        while True:
            group_id = self.cursor.served
            ids, metadata = self.train.items[self.cursor.next()]
            yield Prompt(group_id, list(ids), {"task": "math", **metadata})

    def eval_prompts(self) -> list[Prompt]:
        if self.eval is None:
            return []
        return [Prompt(k, list(ids), {"task": "math", **metadata})
                for k, (ids, metadata) in enumerate(self.eval.items)]

    def reward(self, metadata: dict[str, Any], response_ids: Sequence[int]) -> float:
        text = self.tokenizer.decode(cut_at_eos(response_ids, self.tokenizer.eos_token_id),
                                     skip_special_tokens=True)
        return math_reward(text, metadata["answer"], self.reward_config, self.judge)

    def state_dict(self) -> dict[str, Any]:
        return {"task": "math", "cursor": self.cursor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("task") != "math":
            raise ValueError(f"cannot resume the math task from {state!r}")
        self.cursor.load_state_dict(state["cursor"])

    def close(self) -> None:
        """Stop the sympy worker process."""
        self.judge.close()
