"""The recorded-rollout file: round trip, and bad records named by line and field."""

import json

import pytest

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
