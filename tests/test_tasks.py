"""Tasks: the tiny tokenizer, the synthetic task, prompt files, the resumable cursor, math answers."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from megatron_vespo.config import ConfigError, build
from megatron_vespo.tasks import (CLASSES, TINY_VOCAB_SIZE, EpochCursor, MathRewardConfig,
                                  PromptDataConfig, PromptDataError, PromptDataset, SympyJudge,
                                  SyntheticConfig, SyntheticTask, TaskConfig, build_task,
                                  build_tiny_tokenizer, last_boxed, math_reward, save_tiny_tokenizer,
                                  synthetic_prompt_text, synthetic_reward, uniform_policy_reward)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def judge():
    judge = SympyJudge(timeout_s=5.0)
    yield judge
    judge.close()


# --- tiny tokenizer ------------------------------------------------------------------------------

def test_tiny_tokenizer_round_trips_text_and_loads_with_auto_tokenizer(tokenizer, tmp_path):
    text = "even:q7x2c> 0+1=1 (ok)!"
    ids = tokenizer(text).input_ids
    assert len(tokenizer) == TINY_VOCAB_SIZE == 64
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    loaded = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path / "model"))
    assert loaded(text).input_ids == ids and len(loaded) == 64
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True) == text


def test_tiny_tokenizer_maps_unknown_characters_to_unk(tokenizer):
    assert tokenizer("A\n").input_ids[1:] == [tokenizer.unk_token_id] * 2


# --- synthetic task ------------------------------------------------------------------------------

def test_synthetic_prompts_are_deterministic_fixed_length_and_eval_is_disjoint(tokenizer):
    def task(seed):
        return SyntheticTask(tokenizer, SyntheticConfig(), seed=seed, eval_size=200)

    stream = task(3).train_prompts()
    train = [next(stream) for _ in range(400)]
    again = task(3).train_prompts()
    assert [next(again) for _ in range(400)] == train
    assert [p.group_id for p in train] == list(range(400))
    assert {len(p.prompt_ids) for p in train} == {12}
    assert [p.metadata["target"] for p in train[:4]] == list(CLASSES)
    eval_texts = {p.metadata["prompt"] for p in task(3).eval_sets()[0].prompts}
    assert len(eval_texts) == 200 and not eval_texts & {p.metadata["prompt"] for p in train}
    assert [next(task(4).train_prompts()) for _ in range(1)] != train[:1]


def test_synthetic_prompt_names_its_class():
    text, target = synthetic_prompt_text(seed=0, index=6, split="train")
    assert text.startswith(target + ":") and text.endswith(">") and len(text) == 11


def test_synthetic_reward_credit():
    assert synthetic_reward("even", "02468024", 8) == 1.0
    assert synthetic_reward("odd", "02468024", 8) == 0.0
    assert synthetic_reward("even", "0246", 8) == 0.5  # short: n / K
    assert synthetic_reward("even", "0246802468024680", 8) == 0.5  # long: K / n
    assert synthetic_reward("vowel", "aeixxxxx", 8) == 3 / 8
    assert synthetic_reward("op", "", 8) == 0.0


def test_synthetic_reward_reads_ids_up_to_eos(tokenizer):
    task = SyntheticTask(tokenizer, SyntheticConfig(answer_length=4), seed=0, eval_size=1)
    prompt = task.eval_sets()[0].prompts[0]
    good = next(iter(CLASSES[prompt.metadata["target"]]))
    answer = tokenizer(good * 4, add_special_tokens=False).input_ids
    assert task.reward(prompt.metadata, answer + [tokenizer.eos_token_id]) == 1.0
    assert task.reward(prompt.metadata, answer + [tokenizer.eos_token_id] + answer) == 1.0
    assert task.reward(prompt.metadata, answer + [999]) == 4 / 5  # an id beyond the vocabulary


def test_uniform_random_policy_reward_matches_the_analytic_value(tokenizer):
    vocab, max_new, k = TINY_VOCAB_SIZE, 16, 8
    expected = uniform_policy_reward(vocab, max_new, k)
    assert expected == pytest.approx(0.0740, abs=5e-5)  # the value quoted in synthetic.py
    task = SyntheticTask(tokenizer, SyntheticConfig(answer_length=k), seed=1, eval_size=4)
    prompts, rng, n = task.eval_sets()[0].prompts, random.Random(0), 10000  # one prompt per class
    total = sum(task.reward(prompts[i % 4].metadata, rng.choices(range(vocab), k=max_new))
                for i in range(n))
    # The reward's std is below 0.1, so the standard error of the mean is below 0.001.
    assert total / n == pytest.approx(expected, abs=0.004)


def test_synthetic_task_resumes_from_its_state(tokenizer):
    task = build_task(TaskConfig(), tokenizer)
    stream = task.train_prompts()
    [next(stream) for _ in range(5)]
    state = task.state_dict()
    expected = [next(stream) for _ in range(3)]
    resumed = build_task(TaskConfig(), tokenizer)
    resumed.load_state_dict(state)
    stream = resumed.train_prompts()
    assert [next(stream) for _ in range(3)] == expected


# --- prompt files --------------------------------------------------------------------------------

ROWS = [
    {"q": "one plus one", "sol": {"gt": "2"}, "uid": "a"},
    {"q": "x" * 50, "sol": {"gt": "50"}, "uid": "b"},
    {"q": "two times 3", "sol": {"gt": 6}, "uid": "c"},
]
KEYS = dict(prompt_key="q", answer_key="sol.gt", id_key="uid", max_prompt_tokens=20)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_prompt_file_with_custom_keys_counts_skipped_prompts(tokenizer, tmp_path, fmt, caplog):
    path = tmp_path / f"p.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, ROWS)
    else:
        pq.write_table(pa.Table.from_pylist([{**r, "sol": {"gt": str(r["sol"]["gt"])}} for r in ROWS]),
                       path)
    data = PromptDataset(path, tokenizer, PromptDataConfig(**KEYS))
    assert len(data) == 2 and data.num_rows == 3 and data.num_skipped == 1
    assert "skipped 1 of 3" in caplog.text and data.skipped[0].endswith(("line 2", "row 1"))
    ids, meta = data.items[1]
    assert ids == tokenizer("two times 3").input_ids
    assert (meta["id"], meta["answer"]) == ("c", "6")
    truncated = PromptDataset(path, tokenizer, PromptDataConfig(**KEYS, overlong="truncate_left"))
    assert len(truncated) == 3 and truncated.num_truncated == 1 and len(truncated.items[1][0]) == 20


def test_prompt_file_errors_name_file_row_and_field(tokenizer, tmp_path):
    config = PromptDataConfig(**KEYS)
    missing = _write_jsonl(tmp_path / "m.jsonl", [ROWS[0], {"q": "hi", "uid": "z"}])
    with pytest.raises(PromptDataError, match=r"m\.jsonl:line 2: missing field 'sol\.gt'"):
        PromptDataset(missing, tokenizer, config)
    broken = tmp_path / "b.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(PromptDataError, match=r"b\.jsonl:line 2: not valid JSON"):
        PromptDataset(broken, tokenizer, config)
    wrong = tmp_path / "w.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "ok", "sol": {"gt": "1"}, "uid": "a"},
                                         {"q": "", "sol": {"gt": "1"}, "uid": "b"}]), wrong)
    with pytest.raises(PromptDataError, match=r"w\.parquet:row 1: field 'q'"):
        PromptDataset(wrong, tokenizer, config)
    with pytest.raises(PromptDataError, match="no such file"):
        PromptDataset(tmp_path / "absent.jsonl", tokenizer, config)


def test_chat_messages_use_the_chat_template(tokenizer, tmp_path):
    chat = build_tiny_tokenizer()
    chat.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }};"
                          "{% endfor %}{% if add_generation_prompt %}a:{% endif %}")
    path = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "hi"}],
                                                "answer": "1"}])
    expected = chat("u:hi;a:", add_special_tokens=False).input_ids
    assert PromptDataset(path, chat, PromptDataConfig()).items[0][0] == expected
    with pytest.raises(PromptDataError, match="no chat template"):
        PromptDataset(path, tokenizer, PromptDataConfig())


# --- cursor --------------------------------------------------------------------------------------

def test_cursor_shuffles_each_epoch_and_resumes_exactly():
    cursor = EpochCursor(5, seed=7)
    first = [cursor.next() for _ in range(5)]
    second = [cursor.next() for _ in range(5)]
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    assert cursor.served == 10
    run = EpochCursor(5, seed=7)
    [run.next() for _ in range(7)]
    resumed = EpochCursor(5, seed=7)
    resumed.load_state_dict(run.state_dict())
    assert [resumed.next() for _ in range(9)] == [run.next() for _ in range(9)]
    with pytest.raises(ValueError, match="num_items"):
        EpochCursor(6, seed=7).load_state_dict(run.state_dict())


def test_math_task_serves_an_epoch_then_reshuffles_and_scores(tokenizer, tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(4)]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    config = build(TaskConfig, {"name": "math", "eval_size": 2,
                                "data": {"path": str(path), "eval_path": str(path),
                                         "prompt_key": "question"}})
    task = build_task(config, tokenizer)
    stream = task.train_prompts()
    served = [next(stream) for _ in range(8)]
    assert [p.group_id for p in served] == list(range(8))
    assert sorted(p.metadata["answer"] for p in served[:4]) == ["0", "1", "2", "3"]
    (heldout,) = task.eval_sets()
    assert heldout.config.name == "heldout" and len(heldout.prompts) == 2
    meta = served[0].metadata
    response = tokenizer(f"so {{{meta['answer']}}}", add_special_tokens=False).input_ids
    assert task.reward(meta, response) == 0.0  # braces without a box
    task.close()


def test_task_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"name='poetry' is unknown; allowed: \['math', 'synthetic'\]"):
        build(TaskConfig, {"name": "poetry"}, "task")
    with pytest.raises(ConfigError, match="data.path is required"):
        build(TaskConfig, {"name": "math"}, "task")
    with pytest.raises(ConfigError, match=r"task.data: overlong='cut'"):
        build(TaskConfig, {"data": {"overlong": "cut"}}, "task")
    with pytest.raises(ConfigError, match=r"task.math.rel_tol: expected a number"):
        build(TaskConfig, {"math": {"rel_tol": "big"}}, "task")


# --- math answers --------------------------------------------------------------------------------

EQUIVALENT = [
    (r"The answer is \boxed{42}.", "42"),
    (r"\boxed{\boxed{7}}", "7"),
    (r"first \boxed{3}, finally \boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}"),
    (r"\boxed{\tfrac{3}{4}}", "0.75"),
    (r"\boxed{\frac34}", "3/4"),
    (r"\boxed{0.50}", r"\frac{1}{2}"),
    (r"\boxed{-\frac{2}{4}}", "-0.5"),
    (r"\boxed{1,234,567}", "1234567"),
    (r"\boxed{1{,}000}", "1000"),
    (r"\boxed{50\%}", "0.5"),
    (r"\boxed{50\%}", "50"),
    (r"\boxed{90^\circ}", "90"),
    (r"\boxed{90^{\circ}}", r"90^\circ"),
    (r"\boxed{\$18.90}", "18.9"),
    (r"\boxed{12\text{ cm}}", "12"),
    (r"\boxed{5\,\mathrm{m}^2}", "5"),
    (r"\boxed{x = 3}", "3"),
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)"),
    (r"\boxed{(0.5, 3)}", r"(\frac{1}{2},3)"),
    (r"\boxed{\text{(B)}}", "(B)"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),
    (r"\boxed{\frac{\pi}{2}}", r"\pi/2"),
    (r"\boxed{x^2-1}", "(x-1)(x+1)"),
    (r"\boxed{\sqrt[3]{27}}", "3"),
    (r"\boxed 5", "5"),
    (r"\boxed{1.0000001}", "1"),
    (r"\boxed{3.}", "3"),
    (r"$\boxed{\{1,2\}}$", r"\{1,2\}"),
    ("\\boxed{7}", "\\boxed{7}"),
]
NOT_EQUIVALENT = [
    (r"\boxed{41}", "42"),
    (r"\boxed{\frac{1}{3}}", "0.33"),
    (r"\boxed{(1,2)}", "(2,1)"),
    (r"\boxed{(1,2)}", "[1,2]"),
    (r"\boxed{x+1}", "x+2"),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{8}"),
    (r"\boxed{1.01}", "1"),
    (r"\boxed{\frac{1}{0}}", "0"),
    (r"\boxed{}", "0"),
    (r"\boxed{12", "12"),
    (r"\boxed{\text{A}}", "B"),
    (r"\boxed{__import__('os').getcwd()}", "1"),
]


@pytest.mark.parametrize("response, reference", EQUIVALENT)
def test_equivalent_answers_score_one(response, reference, judge):
    assert math_reward(response, reference, MathRewardConfig(), judge) == 1.0


@pytest.mark.parametrize("response, reference", NOT_EQUIVALENT)
def test_wrong_answers_score_zero(response, reference, judge):
    assert math_reward(response, reference, MathRewardConfig(), judge) == 0.0


def test_missing_box_scores_the_format_penalty(judge):
    assert math_reward("the answer is 42", "42", MathRewardConfig(), judge) == 0.0
    assert math_reward("the answer is 42", "42", MathRewardConfig(no_box_penalty=0.5), judge) == -0.5


def test_last_boxed_keeps_nested_braces():
    assert last_boxed(r"\boxed{\frac{a}{b^{2}}} and then") == r"\frac{a}{b^{2}}"
    assert last_boxed("no box") is None


def test_a_hanging_sympy_comparison_times_out_and_the_judge_recovers():
    judge = SympyJudge(timeout_s=0.5)
    try:
        assert not judge.equal("9^{9^{9^{9}}}", "1")
        assert judge.equal("2x", "x+x")
    finally:
        judge.close()
