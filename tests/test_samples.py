"""The recorded-rollout file: round trip, and bad records named by line and field."""

import dataclasses
import json

import numpy as np
import pytest

from megatron_vespo.learner.sample_files import open_rollout_file
from megatron_vespo.learner.samples import Sample, SampleError, read_samples, write_samples


def sample(i=0, **kw):
    base = dict(sample_id=f"s{i}", group_id=i // 2, prompt_ids=[1, 2, 3], response_ids=[4, 5],
                reward=1.0, engine_logprobs=[-0.5, -1.5], policy_version=3)
    return {**base, **kw}


def write_raw(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_round_trip_keeps_every_field(tmp_path):
    samples = [Sample(**sample(i)) for i in range(3)]
    write_samples(tmp_path / "r.jsonl", samples)
    assert read_samples(tmp_path / "r.jsonl", vocab_size=8) == samples


def test_nonfinite_engine_logprobs_are_legal(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(sample(), allow_nan=True).replace("-0.5", "NaN") + "\n")
    (s,) = read_samples(path)
    assert s.engine_logprobs[0] != s.engine_logprobs[0]


@pytest.mark.parametrize("row, message", [
    (sample(reward=None) | {"reward": "high"}, r"r\.jsonl:2: field 'reward' must be a finite number"),
    ({k: v for k, v in sample().items() if k != "engine_logprobs"}, r":2: missing field\(s\) \['engine_logprobs'\]"),
    (sample(response_ids=[4, 99]), r":2: field 'response_ids' has token id 99 outside the vocabulary \[0, 8\)"),
    (sample(prompt_ids=[1, "2"]), r":2: field 'prompt_ids' must be a list of integers"),
    (sample(engine_logprobs=[-0.5]), r":2: field 'engine_logprobs' has 1 entries for 2 response tokens"),
    (sample(extra=1), r":2: unknown field\(s\) \['extra'\]"),
    (sample(group_id=1.5), r":2: field 'group_id' must be an integer"),
    (sample(i=0), r":2: duplicate sample_id 's0'"),
    (sample(i=1, routed_experts=[[[0, 1]]] * 3), r":2: field 'routed_experts' must be \[prompt_len "
                                                 r"\+ response_len - 1 = 4, num_moe_layers, top_k\]"),
    (sample(i=1, routed_experts=[[[0, 9]]] * 4), r":2: field 'routed_experts': routed expert id 9 is "
                                                 r"outside \[0, 4\)"),
    (sample(i=1, routed_experts=[[[0, -1]]] * 4), r":2: field 'routed_experts': routed expert id -1"),
    (sample(i=1, routed_experts=[[[0, 1]], [[2]], [[0, 1]], [[0, 1]]]), r":2: field 'routed_experts'"),
    ("{not json", r":2: not valid JSON"),
])
def test_bad_records_name_line_and_field(tmp_path, row, message):
    path = tmp_path / "r.jsonl"
    write_raw(path, [sample(0), row])
    with pytest.raises(SampleError, match=message):
        read_samples(path, vocab_size=8, num_experts=4)


def test_routes_are_kept_compact_and_round_trip(tmp_path):
    """Routes live as uint8 arrays (up to 256 experts) from the engine's payload or the file."""
    import base64

    import numpy as np

    from megatron_vespo.rollout.routed_experts import decode_routed_experts

    routes = np.array([[[3, 1], [0, 2]]] * 4, dtype="<i4")  # 4 fed tokens, 2 layers, top-2
    decoded = decode_routed_experts(base64.b64encode(routes.tobytes()).decode(), 4, 2, 4)
    assert decoded.dtype == np.uint8 and decoded.shape == (4, 2, 2)
    assert np.array_equal(decoded, routes)
    assert decode_routed_experts(base64.b64encode((routes * 100).tobytes()).decode(), 4, 2,
                                 num_experts=512).dtype == np.uint16
    with pytest.raises(ValueError, match=r"routed expert id 3 is outside \[0, 3\)"):
        decode_routed_experts(base64.b64encode(routes.tobytes()).decode(), 4, 2, 3)
    samples = [Sample(**sample(i), routed_experts=decoded) for i in range(2)]
    write_samples(tmp_path / "r.jsonl", samples)
    back = read_samples(tmp_path / "r.jsonl", vocab_size=8, num_experts=4)
    assert back == samples and back[0].routed_experts.dtype == np.uint8
    other = decoded.copy()
    other[2, 1, 0] = 1
    assert back[0] != Sample(**sample(0), routed_experts=other)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 4 * 3 * 2 * 7])
def test_uint8_fast_decode_equals_the_full_decode(count):
    """Ids below 256 are read from 6 of every 16 base64 characters; anything else (an id >= 256,
    a negative one, a character outside base64) falls back to the full decode and its error."""
    import base64

    from megatron_vespo.rollout.routed_experts import _low_bytes, decode_routed_experts

    ids = np.random.default_rng(count).integers(0, 256, count, dtype="<i4")
    ids[-1] = 255
    payload = base64.b64encode(ids.tobytes()).decode()
    assert np.array_equal(_low_bytes(payload, count), ids)
    assert np.array_equal(decode_routed_experts(payload, count, 1, 256).reshape(-1), ids)
    for bad in (256, -1, 1 << 24):
        wrong = ids.copy()
        wrong[count // 2] = bad
        text = base64.b64encode(wrong.tobytes()).decode()
        assert _low_bytes(text, count) is None
        with pytest.raises(ValueError, match=f"routed expert id {bad} is outside"):
            decode_routed_experts(text, count, 1, 256)
    assert _low_bytes(payload.replace(payload[1], "*", 1), count) is None


def test_empty_file_and_atomic_write(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(SampleError, match="no samples"):
        read_samples(tmp_path / "e.jsonl")
    target = tmp_path / "out.jsonl"
    target.write_text("previous\n")

    def broken():
        yield Sample(**sample(0))
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        write_samples(target, broken())
    assert target.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


# --- Parquet, and lazy reading of both formats (learner.sample_files) ----------------------------

def routed_sample(i, experts=6, **kw):
    rng = np.random.default_rng(i)
    raw = sample(i, **kw)
    rows = len(raw["prompt_ids"]) + len(raw["response_ids"]) - 1
    return Sample(**{**raw, "routed_experts": rng.integers(0, experts, (rows, 2, 3)).astype(np.uint8),
                     "metadata": {"answer": str(i)}})


def test_parquet_round_trip_lazy_ranges_and_directories(tmp_path):
    samples = [routed_sample(i) for i in range(6)]
    samples[3] = dataclasses.replace(samples[3], routed_experts=None,
                                     engine_logprobs=[float("nan"), -1.0])
    write_samples(tmp_path / "a" / "r.parquet", samples)
    back = read_samples(tmp_path / "a" / "r.parquet", vocab_size=8, num_experts=6)
    assert [s.sample_id for s in back] == [s.sample_id for s in samples]
    for got, want in zip(back, samples):
        assert got.metadata == want.metadata and got.reward == want.reward
        assert np.array_equal(got.prompt_ids, want.prompt_ids)
        np.testing.assert_array_equal(got.engine_logprobs, want.engine_logprobs)  # NaN kept
        assert (got.routed_experts is None) == (want.routed_experts is None)
        if want.routed_experts is not None:
            assert got.routed_experts.dtype == np.uint8
            assert np.array_equal(got.routed_experts, want.routed_experts)
    rollouts = open_rollout_file(tmp_path / "a" / "r.parquet")
    assert rollouts.num_samples == 6 and rollouts.rows_without_routes == 1
    assert [s.sample_id for s in rollouts.samples(2, 5)] == ["s2", "s3", "s4"]
    write_samples(tmp_path / "a" / "s.parquet", [routed_sample(i) for i in range(6, 8)])
    both = open_rollout_file(tmp_path / "a")  # a directory: its files in name order
    assert [s.sample_id for s in both.samples(5, 8)] == ["s5", "s6", "s7"]
    jsonl = tmp_path / "r.jsonl"
    write_samples(jsonl, samples)
    lazy = open_rollout_file(jsonl, vocab_size=8)
    assert lazy.rows_without_routes == 1
    assert list(lazy.samples(4, 6)) == samples[4:6]


@pytest.mark.parametrize("change, message", [
    (dict(response_ids=[4, 99]), r"r\.parquet row 1: field 'response_ids' has token id 99 outside "
                                 r"the vocabulary \[0, 8\)"),
    (dict(engine_logprobs=[-0.5]), r"row 1: field 'engine_logprobs' has 1 entries for 2 response"),
    (dict(reward=float("inf")), r"row 1: field 'reward' must be a finite number"),
    (dict(routed_experts=np.full((4, 2, 3), 7, np.uint8)),
     r"row 1: field 'routed_experts': routed expert id 7 is outside \[0, 6\)"),
    (dict(routed_experts=np.zeros((3, 2, 3), np.uint8)),
     r"row 1: field 'routed_experts' has 18 values, not \(prompt_len \+ response_len - 1\) x 2 x 3"),
    (dict(sample_id="s0"), r"row 1: duplicate sample_id 's0'"),
])
def test_bad_parquet_rows_are_named_by_row_and_field(tmp_path, change, message):
    samples = [routed_sample(0), dataclasses.replace(routed_sample(1), **change)]
    write_samples(tmp_path / "r.parquet", samples)
    with pytest.raises(SampleError, match=message):
        read_samples(tmp_path / "r.parquet", vocab_size=8, num_experts=6)
