"""Tasks: where prompts come from and how responses are rewarded.

`build_task(TaskConfig, tokenizer)` gives a Task: `train_prompts()` (endless, resumable through
`state_dict`), `eval_sets()` (held out, each with its k and sampling) and `rewards(metadata,
response_ids)`. Built in: "synthetic" (a character task a tiny model learns from scratch, with the
local tiny tokenizer) and "math" (prompt files, \\boxed answers checked by Math-Verify or by this
project's normaliser).
"""

from .base import Prompt, Task, cut_at_eos
from .cursor import EpochCursor
from .math_answer import last_boxed, normalize_answer
from .math_equivalence import SympyJudge, equivalent, numbers_equal
from .eval_sets import EvalSet, EvalSetConfig, pass_at_k, set_metrics
from .math_task import MathRewardConfig, MathTask, MathVerifier, math_reward
from .prompt_data import PromptDataConfig, PromptDataError, PromptDataset, encode_prompt, read_rows
from .registry import TASKS, TaskConfig, build_task, load_tokenizer
from .synthetic import (CLASSES, SyntheticConfig, SyntheticTask, synthetic_prompt_text,
                        synthetic_reward, uniform_policy_reward)
from .tiny_tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer, save_tiny_tokenizer

__all__ = [
    "CLASSES", "EpochCursor", "EvalSet", "EvalSetConfig", "MathRewardConfig", "MathTask",
    "MathVerifier", "pass_at_k", "set_metrics", "Prompt", "PromptDataConfig",
    "PromptDataError", "PromptDataset", "SympyJudge", "SyntheticConfig", "SyntheticTask", "TASKS",
    "TINY_VOCAB_SIZE", "Task", "TaskConfig", "build_task", "build_tiny_tokenizer", "cut_at_eos",
    "encode_prompt", "equivalent", "last_boxed", "load_tokenizer", "math_reward", "normalize_answer", "numbers_equal",
    "read_rows", "save_tiny_tokenizer", "synthetic_prompt_text", "synthetic_reward",
    "uniform_policy_reward",
]
