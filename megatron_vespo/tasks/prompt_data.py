"""Prompt datasets for real runs: rows of a .jsonl or .parquet file -> token ids + metadata.

Each row gives a prompt (a string, or a list of chat messages {"role", "content"}), a reference
answer and optionally an id, under configurable field names; a dotted name reaches into nested
objects ("reward_model.ground_truth"). Prompts are rendered with the tokenizer's chat template when
enabled and present (else as plain text, with the tokenizer's own special tokens), tokenised once at
load, and those longer than `max_prompt_tokens` are skipped or left-truncated, counted and logged.
A row that cannot be used raises PromptDataError naming the file, the line/row and the field.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

logger = logging.getLogger(__name__)

OVERLONG_POLICIES = ("skip", "truncate_left")


class PromptDataError(ValueError):
    """A dataset problem; the message names the file, the line or row, and the field."""


@dataclass(frozen=True)
class PromptDataConfig:
    """Where prompts come from and how they become token ids.

    path / eval_path: .jsonl or .parquet files (eval_path optional). prompt_key, answer_key, id_key:
    field names, dotted for nested objects; id_key None = the row's location. max_prompt_tokens:
    longer prompts are skipped ("skip") or keep their last tokens ("truncate_left", so that the
    chat template's generation prompt survives). chat_template: render with the tokenizer's chat
    template when it has one. shuffle: a fresh deterministic order every epoch.
    """

    path: Optional[str] = None
    eval_path: Optional[str] = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    id_key: Optional[str] = None
    max_prompt_tokens: int = 1024
    overlong: str = "skip"
    chat_template: bool = True
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong={self.overlong!r} is unknown; allowed: {list(OVERLONG_POLICIES)}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        for name in ("prompt_key", "answer_key"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty field name")
        for name in ("path", "eval_path"):
            value = getattr(self, name)
            if value is not None and Path(value).suffix not in (".jsonl", ".parquet"):
                raise ValueError(f"{name}={value!r}: expected a .jsonl or .parquet file")


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(location, row) for every row: "FILE:line N" (1-based, blank lines skipped) for .jsonl,
    "FILE:row N" (0-based) for .parquet."""
    path = Path(path)
    if not path.is_file():
        raise PromptDataError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    where = f"{path}:line {number}"
                    try:
                        yield where, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PromptDataError(f"{where}: not valid JSON ({e.msg})") from None
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq  # only runs with parquet data need pyarrow

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise PromptDataError(f"{path}: cannot read parquet ({e})") from None
        for number, row in enumerate(rows):
            yield f"{path}:row {number}", row
    else:
        raise PromptDataError(f"{path}: expected a .jsonl or .parquet file")


def get_field(row: Any, key: str, where: str) -> Any:
    """row[key], following dots into nested objects; PromptDataError naming the field if absent."""
    if not isinstance(row, dict):
        raise PromptDataError(f"{where}: expected an object, got {type(row).__name__}")
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            keys = sorted(row)
            raise PromptDataError(f"{where}: missing field {key!r} (the row has fields {keys})")
        node = node[part]
    return node


def _check_prompt(prompt: Any, key: str, where: str) -> Any:
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise PromptDataError(f"{where}: field {key!r} must be a non-empty string or a list of "
                          f"{{'role', 'content'}} messages, got {str(prompt)[:80]!r}")


def _check_answer(answer: Any, key: str, where: str) -> str:
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer) == "":
        raise PromptDataError(f"{where}: field {key!r} must be a non-empty string or number, "
                              f"got {str(answer)[:80]!r}")
    return str(answer)


def check_prompt_file(path: str | os.PathLike, config: PromptDataConfig) -> int:
    """Every row of a prompt file has a usable prompt and answer (the fields named by `config`),
    checked without tokenising; returns the row count. PromptDataError names the row and field."""
    rows = 0
    for where, row in read_rows(path):
        _check_prompt(get_field(row, config.prompt_key, where), config.prompt_key, where)
        _check_answer(get_field(row, config.answer_key, where), config.answer_key, where)
        rows += 1
    if not rows:
        raise PromptDataError(f"{path}: no rows")
    return rows


def encode_prompt(tokenizer: Any, prompt: str | list[dict], use_chat_template: bool,
                  where: str = "prompt") -> list[int]:
    """Token ids of a prompt: chat template (with the generation prompt) when `use_chat_template`
    and the tokenizer has one, else the plain string with the tokenizer's special tokens."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        # Render to text, then encode without extra specials: the template writes its own (e.g. <bos>),
        # and apply_chat_template(tokenize=True) changed its return type across transformers versions.
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    if not isinstance(prompt, str):
        raise PromptDataError(f"{where}: the prompt is a list of chat messages but no chat template "
                              f"is applied (chat_template disabled, or the tokenizer has none)")
    return list(tokenizer(prompt).input_ids)


class PromptDataset:
    """The usable prompts of one file, tokenised: `items[i]` = (prompt_ids, metadata).

    metadata = {"id", "answer", "source"} (source = "FILE:line N" / "FILE:row N", also the id when
    there is no id_key). Counters:
    num_rows read, num_skipped / num_truncated for overlong prompts, `skipped` their locations.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Any, config: PromptDataConfig,
                 limit: Optional[int] = None):
        self.path = str(path)
        self.items: list[tuple[list[int], dict[str, Any]]] = []
        self.num_rows = self.num_truncated = 0
        self.skipped: list[str] = []
        for where, row in read_rows(path):
            if limit is not None and len(self.items) >= limit:
                break
            self.num_rows += 1
            prompt = _check_prompt(get_field(row, config.prompt_key, where), config.prompt_key, where)
            answer = _check_answer(get_field(row, config.answer_key, where), config.answer_key, where)
            row_id = str(get_field(row, config.id_key, where)) if config.id_key is not None else where
            ids = encode_prompt(tokenizer, prompt, config.chat_template, where)
            if len(ids) > config.max_prompt_tokens:
                if config.overlong == "skip":
                    self.skipped.append(where)
                    continue
                ids = ids[-config.max_prompt_tokens:]
                self.num_truncated += 1
            self.items.append((ids, {"id": row_id, "answer": answer, "source": where}))
        self._report(config.max_prompt_tokens)
        if not self.items:
            raise PromptDataError(f"{self.path}: no usable prompts ({self.num_rows} rows read, "
                                  f"{self.num_skipped} longer than max_prompt_tokens)")

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def _report(self, max_tokens: int) -> None:
        if self.skipped:
            logger.warning("%s: skipped %d of %d prompts longer than max_prompt_tokens=%d (first: %s)",
                           self.path, self.num_skipped, self.num_rows, max_tokens,
                           ", ".join(self.skipped[:3]))
        if self.num_truncated:
            logger.warning("%s: left-truncated %d of %d prompts to max_prompt_tokens=%d", self.path,
                           self.num_truncated, self.num_rows, max_tokens)
        logger.info("%s: %d prompts from %d rows", self.path, len(self.items), self.num_rows)

    def __len__(self) -> int:
        return len(self.items)
