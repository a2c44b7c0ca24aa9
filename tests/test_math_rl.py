"""Math RL as the paper runs it: the verifiers on the shipped answer table, the worker pool's
timeout, avg@k / pass@k against hand-computed values, evaluation-set configs, the data recipes on
small files in the published schemas, and the paper's Qwen3-30B-A3B math config."""

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_vespo.cli import main as cli
from megatron_vespo.config import ConfigError, build, load_config
from megatron_vespo.tasks import (EvalSetConfig, MathRewardConfig, MathVerifier, PromptDataConfig,
                                  PromptDataError, TaskConfig, build_task, build_tiny_tokenizer,
                                  pass_at_k, set_metrics)
from megatron_vespo.tasks.eval_sets import eval_metrics
from megatron_vespo.tasks.recipes import INSTRUCTION, prepare_data

REPO = Path(__file__).resolve().parent.parent
TABLE = [json.loads(line) for line in (REPO / "benchmarks" / "math_answer_pairs.jsonl").read_text().splitlines()]


def _verdicts(**kw) -> list[float]:
    verifier = MathVerifier(MathRewardConfig(workers=2, **kw))
    try:
        return verifier.scores([r["response"] for r in TABLE], [r["reference"] for r in TABLE])
    finally:
        verifier.close()


def _misses(verdicts) -> set[str]:
    return {r["response"] for r, v in zip(TABLE, verdicts) if (v > 0) != r["equal"]}


def test_verifiers_on_the_answer_table():
    """The table's verdicts as benchmarks/math_verifiers.py reports them: Math-Verify with the
    normaliser's string/number fast path gets every row; each alone misses a few, never with a
    false positive."""
    categories = {r["category"] for r in TABLE}
    assert {"fraction", "decimal", "interval", "tuple", "units", "degrees", "latex",
            "percent", "set"} <= categories and sum(not r["equal"] for r in TABLE) >= 15
    assert _misses(_verdicts()) == set()
    assert _misses(_verdicts(fast_path=False)) == {r"\boxed{3.}", r"\boxed{1.0000001}"}
    assert _misses(_verdicts(verifier="normalizer")) == {
        r"\boxed{x \in (0, 1)}", r"\boxed{\{2,1\}}", r"\boxed{1, 2}"}


def test_no_box_scores_the_penalty_and_a_hanging_answer_times_out():
    verifier = MathVerifier(MathRewardConfig(workers=1, timeout_s=1.0, fast_path=False,
                                             no_box_penalty=0.5))
    try:
        assert verifier.scores(["the answer is 42", r"\boxed{42}"], ["42", "42"]) == [-0.5, 1.0]
        start = time.perf_counter()
        hostile = r"\boxed{9^{9^{9^{9^{9}}}} - 9^{9^{9^{9^{9}}}} + 1}"
        assert verifier.scores([hostile], ["2"]) == [0.0]
        assert time.perf_counter() - start < 5  # the timeout, then a kill: not minutes
        assert verifier.stats.timeouts == 1
        assert verifier.scores([r"\boxed{\frac{1}{2}}"], ["0.5"]) == [1.0]  # a fresh worker
    finally:
        verifier.close()


# --- avg@k, pass@k -------------------------------------------------------------------------------

def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(3, 3, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


def test_set_metrics_by_hand():
    rewards = np.array([[1, 0, 0, 1], [0, 0, -0.5, 0], [1, 1, 1, 1]], dtype=float)
    lengths = np.array([[10, 20, 30, 40], [5, 5, 5, 5], [1, 1, 1, 1]])
    truncated = np.array([[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    m = set_metrics(rewards, lengths, truncated, 4)
    assert m["avg@4"] == pytest.approx(6 / 12)  # correct responses / all: (2 + 0 + 4) / 12
    assert m["pass@4"] == pytest.approx(2 / 3)  # prompts solved at least once
    assert m["reward"] == pytest.approx(5.5 / 12)  # the no-box penalty counts in the reward only
    assert m["response_tokens"] == pytest.approx(124 / 12) and m["truncated_frac"] == pytest.approx(1 / 12)
    both = eval_metrics({"a": {"avg@4": 0.5, "pass@4": 1.0}, "b": {"avg@1": 0.2, "pass@1": 0.2}},
                        {"a": 4, "b": 1})
    assert both["eval/mean_avg"] == pytest.approx(0.35) and both["eval/mean_pass"] == pytest.approx(0.6)
    assert both["eval/a/avg@4"] == 0.5


def test_eval_set_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="k=4 at temperature 0"):
        build(TaskConfig, {"eval_sets": [{"name": "g", "k": 4}]}, "task")
    with pytest.raises(ConfigError, match="names must be unique"):
        build(TaskConfig, {"eval_sets": [{"name": "g"}, {"name": "g"}]}, "task")
    with pytest.raises(ConfigError, match=r"task.eval_sets\[0\].top_p: expected a number"):
        build(TaskConfig, {"eval_sets": [{"name": "g", "top_p": "x"}]}, "task")
    with pytest.raises(ConfigError, match="synthetic task generates"):
        build(TaskConfig, {"eval_sets": [{"name": "g", "path": "x.jsonl"}]}, "task")
    data = {"path": str(tmp_path / "t.jsonl")}
    with pytest.raises(ConfigError, match="'aime' needs a path"):
        build(TaskConfig, {"name": "math", "data": data, "eval_sets": [{"name": "aime"}]}, "task")
    greedy = build(TaskConfig, {"name": "math", "data": {**data, "eval_path": "e.jsonl"}}, "task")
    assert greedy.resolved_eval_sets == (EvalSetConfig("heldout", "e.jsonl", limit=64),)


# --- data recipes --------------------------------------------------------------------------------

DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response should "
             "be of the form Answer: $Answer (without quotes) where $Answer is the answer to the "
             "problem.\n\n")
DAPO_TAIL = '\n\nRemember to put your answer on its own line after "Answer:".'


def _dapo_row(k: int) -> dict:
    return {"data_source": "math_dapo", "ability": "MATH",
            "prompt": [{"content": f"{DAPO_HEAD}What is {k} + {k}?{DAPO_TAIL}", "role": "user"}],
            "reward_model": {"ground_truth": str(2 * k), "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"uuid-{k}"}}


def test_recipes_turn_published_schemas_into_the_task_format(tmp_path, capsys):
    tok = build_tiny_tokenizer()
    # DAPO-Math-17k: Parquet, every problem repeated (as published), its own instruction.
    pq.write_table(pa.Table.from_pylist([_dapo_row(k % 3) for k in range(9)]), tmp_path / "dapo.parquet")
    assert cli(["prepare-data", "dapo-math-17k", str(tmp_path / "dapo.parquet"),
                str(tmp_path / "train.jsonl")]) == 0
    assert "3 prompts from 9 rows" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert rows[1] == {"id": "uuid-1", "answer": "2", "prompt": [
        {"role": "user", "content": f"What is 1 + 1?\n\n{INSTRUCTION}"}]}
    # The evaluation sets, each in one of its published schemas.
    published = {
        "aime-2024": ("aime24.parquet", {"ID": "2024-I-1", "Problem": "p", "Solution": "s", "Answer": 204}),
        "aime-2025": ("aime25.jsonl", {"question": "p", "answer": "70"}),
        "amc-2023": ("amc.parquet", {"id": 0, "problem": "p", "answer": 27.0, "url": "u"}),
        "math-500": ("math500.jsonl", {"problem": "p", "solution": "s", "answer": r"\frac{14}{3}",
                                       "subject": "Algebra", "level": 3, "unique_id": "test/a/1.json"}),
    }
    expected = {"aime-2024": ("2024-I-1", "204"), "amc-2023": ("0", "27"),
                "math-500": ("test/a/1.json", r"\frac{14}{3}")}
    for recipe, (name, row) in published.items():
        source = tmp_path / name
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist([row]), source)
        else:
            source.write_text(json.dumps(row) + "\n")
        out = tmp_path / f"{recipe}.jsonl"
        prepare_data(recipe, source, out)
        (got,) = [json.loads(line) for line in out.read_text().splitlines()]
        assert got["prompt"] == [{"role": "user", "content": f"p\n\n{INSTRUCTION}"}]
        if recipe in expected:
            assert (got["id"], got["answer"]) == expected[recipe]
    # The files load as the math task's training data and evaluation sets.
    chat = build_tiny_tokenizer()
    chat.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }};"
                          "{% endfor %}{% if add_generation_prompt %}a:{% endif %}")
    config = build(TaskConfig, {"name": "math", "data": {"path": str(tmp_path / "train.jsonl"),
                                                        "id_key": "id", "max_prompt_tokens": 4096},
                                "eval_sets": [{"name": "aime24", "path": str(tmp_path / "aime-2024.jsonl"),
                                               "k": 4, "temperature": 1.0}]}, "task")
    task = build_task(config, chat)
    try:
        (aime,) = task.eval_sets()
        assert aime.config.k == 4 and aime.prompts[0].metadata["answer"] == "204"
        # (The tiny tokenizer has no backslash: the verifier is asked with the texts directly.)
        answer = aime.prompts[0].metadata["answer"]
        assert task.verifier.scores([r"so \boxed{204}", r"\boxed{20}"], [answer] * 2) == [1.0, 0.0]
        assert task.rewards([aime.prompts[0].metadata], [tok("so 204").input_ids]) == [0.0]  # no box
    finally:
        task.close()
    # A row without the answer names the file, the row and the fields looked for.
    pq.write_table(pa.Table.from_pylist([{"Problem": "p", "ID": "x"}]), tmp_path / "bad.parquet")
    with pytest.raises(PromptDataError, match=r"bad.parquet:row 0: no answer \(looked for \['Answer', 'answer'\]"):
        prepare_data("aime-2024", tmp_path / "bad.parquet", tmp_path / "bad.jsonl")
    assert cli(["prepare-data", "aime-2024", str(tmp_path / "bad.parquet"), str(tmp_path / "b.jsonl")]) == 2


def test_the_paper_math_config_loads(tmp_path):
    config = load_config(REPO / "configs" / "qwen3_30b_a3b_math.yaml")
    sets = {s.name: (s.k, s.temperature) for s in config.task.eval_sets}
    assert sets == {"aime24": (32, 1.0), "aime25": (32, 1.0), "amc23": (16, 1.0), "math500": (4, 1.0)}
    assert config.task.name == "math" and config.task.math.verifier == "math_verify"
    assert config.model.num_experts == 128 and config.model.num_experts_per_tok == 8
    assert config.algorithm.loss == "vespo"
    assert isinstance(config.task.data, PromptDataConfig) and config.task.data.path.endswith(".jsonl")
