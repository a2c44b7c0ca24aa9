"""What every task hands the RL loop: prompts (with a group id and metadata) and a reward."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Protocol, Sequence

if TYPE_CHECKING:
    from .eval_sets import EvalSet


class Prompt(NamedTuple):
    """One prompt to sample a group of responses for.

    group_id: unique per served training prompt (it becomes `Sample.group_id`; the responses to one
    prompt form one advantage group). prompt_ids: token ids, ready for the rollout engine.
    metadata: JSON-serialisable facts the reward needs (target, reference answer, source row); it is
    stored in `Sample.metadata` and handed back to `Task.reward`.
    """

    group_id: int
    prompt_ids: list[int]
    metadata: dict[str, Any]


class Task(Protocol):
    """A prompt source plus a verifier. `train_prompts` is endless and resumable through
    `state_dict` / `load_state_dict`; `eval_sets` are fixed prompt lists disjoint from training,
    each with its own k and sampling (tasks/eval_sets.py)."""

    def train_prompts(self) -> Iterator[Prompt]: ...

    def eval_sets(self) -> list["EvalSet"]: ...

    def reward(self, metadata: dict[str, Any], response_ids: Sequence[int]) -> float: ...

    def rewards(self, metadata: Sequence[dict[str, Any]],
                response_ids: Sequence[Sequence[int]]) -> list[float]:
        """The rewards of several responses (a group, an evaluation set), in order; a task with a
        slow verifier checks them in parallel."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def cut_at_eos(response_ids: Sequence[int], eos_token_id: int | None) -> list[int]:
    """The answer: response tokens before the first EOS (the engine may or may not include it)."""
    ids = list(response_ids)
    if eos_token_id is not None and eos_token_id in ids:
        return ids[:ids.index(eos_token_id)]
    return ids
