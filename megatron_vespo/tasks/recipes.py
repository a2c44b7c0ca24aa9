"""Data recipes: the published math sets, as users download them, into the math task's format.

`megatron-vespo prepare-data RECIPE INPUT OUTPUT` reads INPUT (.parquet or .jsonl, in the schema the
set is published with) and writes OUTPUT (.jsonl), one row per problem:

    {"id": ..., "prompt": [{"role": "user", "content": PROBLEM + INSTRUCTION}], "answer": ...}

INSTRUCTION is the paper's ("Please reason step by step, and put your final answer within
\\boxed{}."); the prompt is a chat message, so the policy's chat template renders it when the task
loads the file (task.data.chat_template). Those are the task.data defaults, with id_key: id.

Recipes (the fields each published schema uses; the first one present is taken):
  dapo-math-17k  BytedTsinghua-SIA/DAPO-Math-17k: prompt[0].content (its own "Answer:" instruction
                 removed), reward_model.ground_truth, extra_info.index. The published file repeats
                 every problem; repeats are written once.
  aime-2024      Problem/problem, Answer/answer, ID/id (Maxwell-Jia/AIME_2024, HuggingFaceH4/aime_2024)
  aime-2025      problem/question, answer, id/problem_idx (yentinglin/aime_2025, opencompass/AIME2025,
                 MathArena/aime_2025)
  amc-2023       problem/question, answer, id (AI-MO/aimo-validation-amc, math-ai/amc23)
  math-500       problem, answer, unique_id (HuggingFaceH4/MATH-500)
A row without a problem or an answer is an error naming the file, the row and the fields looked for.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .prompt_data import PromptDataError, read_rows

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# DAPO-Math-17k's own instruction around each problem (its answers come after "Answer:").
_DAPO_HEAD = re.compile(r"^\s*Solve the following math problem step by step\..*?where \$Answer is "
                        r"the answer to the problem\.\s*", re.S)
_DAPO_TAIL = re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$")


@dataclass(frozen=True)
class Recipe:
    """Field names to try, in order (dotted for nested objects; "prompt.0.content" indexes a list)."""

    problem: tuple[str, ...]
    answer: tuple[str, ...]
    id: tuple[str, ...]
    dedupe: bool = False
    strip_dapo_instruction: bool = False


RECIPES = {
    "dapo-math-17k": Recipe(("prompt.0.content",), ("reward_model.ground_truth",),
                            ("extra_info.index",), dedupe=True, strip_dapo_instruction=True),
    "aime-2024": Recipe(("Problem", "problem"), ("Answer", "answer"), ("ID", "id")),
    "aime-2025": Recipe(("problem", "question"), ("answer",), ("id", "problem_idx")),
    "amc-2023": Recipe(("problem", "question"), ("answer",), ("id",)),
    "math-500": Recipe(("problem",), ("answer",), ("unique_id",)),
}


def _lookup(row: Any, key: str) -> Any:
    """row[key] through dots, a numeric part indexing a list; None when absent."""
    node = row
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and node.get(part) is not None:
            node = node[part]
        else:
            return None
    return node


def _first(row: Any, keys: tuple[str, ...], where: str, what: str, required: bool = True) -> Any:
    for key in keys:
        value = _lookup(row, key)
        if value is not None and str(value).strip():
            return value
    if required:
        fields = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise PromptDataError(f"{where}: no {what} (looked for {list(keys)}; the row has {fields})")
    return None


def answer_text(value: Any) -> str:
    """A published answer as the reference string: 27.0 (AMC's floats) -> "27"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def prepare_rows(recipe: Recipe, path: str | os.PathLike) -> tuple[list[dict], dict[str, int]]:
    """The task rows of one downloaded file, and counts: read, written, repeats (dropped),
    instruction_kept (DAPO rows whose own instruction was not found, left as published)."""
    rows, seen = [], set()
    counts = {"read": 0, "written": 0, "repeats": 0, "instruction_kept": 0}
    for where, row in read_rows(path):
        counts["read"] += 1
        problem = str(_first(row, recipe.problem, where, "problem"))
        answer = answer_text(_first(row, recipe.answer, where, "answer"))
        row_id = _first(row, recipe.id, where, "id", required=False)
        if recipe.strip_dapo_instruction:
            stripped = _DAPO_TAIL.sub("", _DAPO_HEAD.sub("", problem))
            counts["instruction_kept"] += stripped == problem
            problem = stripped
        problem = problem.strip()
        if recipe.dedupe:
            if (problem, answer) in seen:
                counts["repeats"] += 1
                continue
            seen.add((problem, answer))
        rows.append({"id": str(row_id) if row_id is not None else where,
                     "prompt": [{"role": "user", "content": f"{problem}\n\n{INSTRUCTION}"}],
                     "answer": answer})
    counts["written"] = len(rows)
    if not rows:
        raise PromptDataError(f"{path}: no rows")
    return rows, counts


def prepare_data(recipe_name: str, source: str | os.PathLike, output: str | os.PathLike,
                 limit: Optional[int] = None) -> dict[str, int]:
    """Write the task file `output` (.jsonl) from a downloaded `source`; returns the counts."""
    if recipe_name not in RECIPES:
        raise ValueError(f"recipe {recipe_name!r} is unknown; allowed: {sorted(RECIPES)}")
    output = Path(output)
    if output.suffix != ".jsonl":
        raise ValueError(f"{output}: the output is a .jsonl file")
    rows, counts = prepare_rows(RECIPES[recipe_name], source)
    rows = rows[:limit]
    counts["written"] = len(rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, output)
    return counts
