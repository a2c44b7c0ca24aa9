"""The math task for real runs: prompts from a dataset file, reward 1 for a correct \\boxed answer.

Reward of a response: decode the tokens before <eos>, take its last \\boxed{...}, and compare it with
the reference answer: 1.0 if equal, 0.0 if not, and -no_box_penalty when the response has no
(closed) box at all (0 by default: the paper's binary reward). Two verifiers (`math.verifier`):
- "math_verify" (default; the one the paper's runs used): Math-Verify, in `workers` killable
  processes with a `timeout_s` budget per answer, so a pathological answer costs at most that and
  is scored 0 (counted in `MathVerifier.stats`). With `fast_path` (default), answers the
  normaliser already finds equal as strings or numbers are not sent to it: most references are
  integers, and this also accepts "3." for 3, which Math-Verify rejects.
- "normalizer": this project's canonical strings (math_answer) and numeric / sympy equality
  (math_equivalence). `benchmarks/math_verifiers.py` measures both on benchmarks/math_answer_pairs.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .base import Prompt, cut_at_eos
from .cursor import EpochCursor
from .eval_sets import EvalSet, EvalSetConfig
from .math_answer import last_boxed, normalize_answer
from .math_equivalence import SympyJudge, equivalent
from .prompt_data import PromptDataConfig, PromptDataset
from .worker_pool import PoolStats, WorkerPool

VERIFIERS = ("math_verify", "normalizer")


@dataclass(frozen=True)
class MathRewardConfig:
    """verifier: "math_verify" or "normalizer" (see the module docstring). no_box_penalty: a
    response without a \\boxed answer scores -no_box_penalty (0 = plain 0/1).
    math_verify: fast_path (the normaliser's string/number check first; false = Math-Verify alone),
    workers processes, timeout_s per answer.
    normalizer: rel_tol for numeric equality; symbolic: try sympy when strings and numbers differ,
    sympy_timeout_s per comparison, answers longer than max_symbolic_chars skipped."""

    verifier: str = "math_verify"
    no_box_penalty: float = 0.0
    fast_path: bool = True
    workers: int = 4
    timeout_s: float = 5.0
    rel_tol: float = 1e-6
    symbolic: bool = True
    sympy_timeout_s: float = 2.0
    max_symbolic_chars: int = 128

    def __post_init__(self) -> None:
        if self.verifier not in VERIFIERS:
            raise ValueError(f"verifier={self.verifier!r} is unknown; allowed: {list(VERIFIERS)}")
        if not 0 <= self.no_box_penalty <= 1:
            raise ValueError(f"no_box_penalty must be in [0, 1], got {self.no_box_penalty}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        for name in ("timeout_s", "sympy_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.rel_tol < 1:
            raise ValueError(f"rel_tol must be in [0, 1), got {self.rel_tol}")
        if self.max_symbolic_chars < 1:
            raise ValueError(f"max_symbolic_chars must be >= 1, got {self.max_symbolic_chars}")


def math_reward(response: str, reference: str, config: MathRewardConfig,
                judge: Optional[SympyJudge]) -> float:
    """The normalizer's reward: 1.0 if the last \\boxed answer of `response` is equivalent to
    `reference`, else 0.0; -no_box_penalty if `response` has no box. `judge` None = no symbolic
    comparison."""
    boxed = last_boxed(response)
    if boxed is None:
        return -config.no_box_penalty
    same = equivalent(normalize_answer(boxed), normalize_answer(reference), config.rel_tol,
                      judge if config.symbolic else None)
    return 1.0 if same else 0.0


def _unboxed(reference: str) -> str:
    """A reference written as a box ("\\boxed{7}") compares as its content."""
    boxed = last_boxed(reference)
    return reference if boxed is None else boxed


class MathVerifier:
    """The configured verifier over many responses at once (thread-safe). Verdicts are cached per
    (answer, reference): the responses of a group repeat answers."""

    CACHE_SIZE = 1 << 16

    def __init__(self, config: MathRewardConfig):
        self.config = config
        self.judge = SympyJudge(config.sympy_timeout_s, config.max_symbolic_chars)
        self.pool = WorkerPool(Path(__file__).with_name("math_verify_worker.py"), config.workers,
                               config.timeout_s)
        self._cache: dict[tuple[str, str], bool] = {}

    @property
    def stats(self) -> PoolStats:
        """Math-Verify answers given, timed out (scored 0) and failed (scored 0)."""
        return self.pool.stats

    def scores(self, responses: Sequence[str], references: Sequence[str]) -> list[float]:
        if self.config.verifier == "normalizer":
            return [math_reward(r, ref, self.config, self.judge) for r, ref in zip(responses, references)]
        boxes = [last_boxed(r) for r in responses]
        keys = [(box, _unboxed(ref)) for box, ref in zip(boxes, references) if box is not None]
        verdicts = {k: self._cache[k] for k in keys if k in self._cache}
        missing = [k for k in dict.fromkeys(keys) if k not in verdicts]
        if self.config.fast_path:
            for k in missing:
                if equivalent(normalize_answer(k[0]), normalize_answer(k[1]), self.config.rel_tol, None):
                    verdicts[k] = True
            missing = [k for k in missing if k not in verdicts]
        answers = self.pool.ask_many([{"answer": a, "reference": ref} for a, ref in missing])
        verdicts.update({k: bool(answer and answer["equal"]) for k, answer in zip(missing, answers)})
        if len(self._cache) + len(verdicts) > self.CACHE_SIZE:
            self._cache.clear()
        self._cache.update(verdicts)
        found = iter(keys)
        return [-self.config.no_box_penalty if box is None else float(verdicts[next(found)])
                for box in boxes]

    def close(self) -> None:
        self.pool.close()
        self.judge.close()


class MathTask:
    """Training prompts from `data.path` in a per-epoch shuffled order (group_id = number of prompts
    served before, so unique across epochs); evaluation sets from their files (each with the
    fields and chat rendering of `data`)."""

    def __init__(self, tokenizer: Any, data: PromptDataConfig, reward_config: MathRewardConfig,
                 seed: int, eval_sets: Sequence[EvalSetConfig] = ()):
        if data.path is None:
            raise ValueError("the math task needs data.path")
        self.tokenizer, self.reward_config = tokenizer, reward_config
        self.train = PromptDataset(data.path, tokenizer, data)
        self.sets = [(s, PromptDataset(s.path, tokenizer, data, limit=s.limit)) for s in eval_sets]
        self.cursor = EpochCursor(len(self.train), seed, shuffle=data.shuffle)
        self.verifier = MathVerifier(reward_config)

    def train_prompts(self) -> Iterator[Prompt]:
        while True:
            group_id = self.cursor.served
            ids, metadata = self.train.items[self.cursor.next()]
            yield Prompt(group_id, list(ids), {"task": "math", **metadata})

    def eval_sets(self) -> list[EvalSet]:
        return [EvalSet(s, [Prompt(k, list(ids), {"task": "math", "eval_set": s.name, **metadata})
                            for k, (ids, metadata) in enumerate(prompts.items)])
                for s, prompts in self.sets]

    def _text(self, response_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(cut_at_eos(response_ids, self.tokenizer.eos_token_id),
                                     skip_special_tokens=True)

    def reward(self, metadata: dict[str, Any], response_ids: Sequence[int]) -> float:
        return self.rewards([metadata], [response_ids])[0]

    def rewards(self, metadata: Sequence[dict[str, Any]],
                response_ids: Sequence[Sequence[int]]) -> list[float]:
        return self.verifier.scores([self._text(r) for r in response_ids],
                                    [m["answer"] for m in metadata])

    def state_dict(self) -> dict[str, Any]:
        return {"task": "math", "cursor": self.cursor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("task") != "math":
            raise ValueError(f"cannot resume the math task from {state!r}")
        self.cursor.load_state_dict(state["cursor"])

    def close(self) -> None:
        """Stop the verifier's worker processes."""
        self.verifier.close()
