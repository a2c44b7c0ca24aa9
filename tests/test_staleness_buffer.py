"""The staleness buffer: no trained group is older than max_staleness, and every admitted group is
accounted for exactly once, under any interleaving of producer and trainer (hypothesis)."""

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_vespo.rollout.buffer import BufferClosed, StalenessBuffer

# Producer/trainer actions: admit a group, finish the oldest / newest running group, fail one,
# or run one training step if a full batch is ready.
ACTIONS = st.lists(st.sampled_from(["admit", "finish_old", "finish_new", "fail", "step"]),
                   min_size=1, max_size=300)


@settings(max_examples=300, deadline=None)
@given(actions=ACTIONS, groups_per_step=st.integers(1, 4), max_staleness=st.integers(0, 4))
def test_no_trained_group_exceeds_max_staleness(actions, groups_per_step, max_staleness):
    buf = StalenessBuffer(groups_per_step, max_staleness)
    running: list[tuple[int, int]] = []  # (group id, start version)
    trained, next_id = [], 0
    for action in actions:
        if action == "admit":
            version = buf.try_admit()
            if version is not None:
                assert version == buf.version
                running.append((next_id, version))
                next_id += 1
        elif action in ("finish_old", "finish_new", "fail") and running:
            gid, version = running.pop(0 if action == "finish_old" else -1)
            if action == "fail":
                buf.release()
            else:
                buf.accept([gid], version)
        elif action == "step":
            batch = buf.take(timeout=0)
            if batch is not None:
                for g in batch:
                    lag = buf.version - g.version
                    assert 0 <= lag <= max_staleness
                    trained.append(g.samples[0])
                buf.advance()
        # Admission control bounds the work in flight at every moment (dropped groups free slots).
        assert buf.stats.accepted - buf.stats.dropped_stale + buf.running <= \
            (max_staleness + buf.version + 1) * groups_per_step
    s = buf.stats
    assert len(trained) == len(set(trained)) == sum(s.lag_histogram.values())
    # Every admitted group is trained, dropped as stale, still queued, or still running.
    assert s.admitted == len(trained) + s.dropped_stale + buf.queue_depth + buf.running
    assert buf.running == len(running)


def test_groups_dropped_as_stale_free_their_slots_and_a_stalled_take_names_the_state():
    """Before: after a resume against servers reporting weight version 0, every group came back
    stale, was dropped, and kept its admission slot; once the slots ran out `take` waited forever."""
    from megatron_vespo.rollout.source import RolloutConfig, RolloutSource

    buf = StalenessBuffer(groups_per_step=2, max_staleness=1)
    buf.version = 40  # the resumed trainer
    for _ in range(100):  # far more groups than the (1 + 40 + 1) * 2 = 84 slots
        assert buf.try_admit() == 40
        buf.accept(["g"], version=0)  # the servers report an old version: every group is stale
        assert buf.take(timeout=0) is None
    assert buf.stats.dropped_stale == 100 and buf.try_admit() is not None
    src = RolloutSource(RolloutConfig(mode="async", wait_timeout_s=0.2), None, iter(()),
                        lambda metas, responses: [1.0] * len(metas), prompts_per_step=2)
    src.buffer = StalenessBuffer(2, 1)
    with pytest.raises(RuntimeError, match=r"no step's groups after rollout.wait_timeout_s=0.2: "
                                           r"policy version 0, 0 of 2 groups ready, 0 running"):
        src.take()


@settings(max_examples=100, deadline=None)
@given(groups_per_step=st.integers(1, 4), max_staleness=st.integers(0, 3), steps=st.integers(1, 12))
def test_in_order_completion_never_drops(groups_per_step, max_staleness, steps):
    """A producer that admits greedily and finishes groups in order trains every group, with lags
    that fill the allowed range."""
    buf = StalenessBuffer(groups_per_step, max_staleness)
    for _ in range(steps):
        while (v := buf.try_admit()) is not None:
            buf.accept(["x"], v)
        assert buf.take(timeout=0) is not None
        buf.advance()
    assert buf.stats.dropped_stale == 0
    assert max(buf.stats.lag_histogram) == min(max_staleness, steps - 1)


def test_threads_producer_and_trainer():
    """A producer thread blocked on admission is woken by the trainer's steps; close() ends both."""
    buf = StalenessBuffer(groups_per_step=2, max_staleness=1)
    produced = []

    def produce():
        while (v := buf.wait_admit(timeout=5)) is not None:
            produced.append(v)
            buf.accept([len(produced)], v)

    t = threading.Thread(target=produce)
    t.start()
    for _ in range(5):
        batch = buf.take(timeout=5)
        assert batch is not None and all(buf.version - g.version <= 1 for g in batch)
        buf.advance()
    buf.close()
    t.join(5)
    assert not t.is_alive()
    with pytest.raises(BufferClosed):
        while True:
            buf.take(timeout=1)


def test_misuse_is_an_error():
    buf = StalenessBuffer(1, 0)
    with pytest.raises(RuntimeError, match="without a matching admit"):
        buf.accept([], 0)
    with pytest.raises(ValueError, match="max_staleness"):
        StalenessBuffer(1, -1)


# -- partial rollouts (a group whose tokens span a weight update) ------------------------------------

class _SpanningClient:
    """Stands in for RolloutClient.generate_group: the first answer for each prompt spans weight
    versions 0 -> 1 (an update landed mid-generation), a re-sent prompt is sampled by version 1."""

    def __init__(self):
        self.calls = []

    async def generate_group(self, session, prompt):
        import math

        from megatron_vespo.learner.samples import Sample

        self.calls.append(prompt.group_id)
        spans = [[0, 0, 2], [1, 2, 4]] if self.calls.count(prompt.group_id) == 1 else [[1, 0, 4]]
        return [Sample(f"{prompt.group_id}-{i}", prompt.group_id, list(prompt.prompt_ids),
                       [3, 4, 5, 6], math.nan, [-1.0] * 4, spans[0][0], None,
                       {"finish_reason": "length", "weight_versions": spans}) for i in range(2)]


@pytest.mark.parametrize("mode", ["finish", "drop"])
def test_partial_rollout_is_kept_or_generated_again(mode):
    import asyncio

    from megatron_vespo.rollout.source import RolloutConfig, RolloutSource
    from megatron_vespo.tasks.base import Prompt

    client = _SpanningClient()
    src = RolloutSource(RolloutConfig(mode="async", partial_rollout=mode, max_staleness=1), client,
                        iter(()), lambda metas, responses: [1.0] * len(metas), prompts_per_step=1)
    src.buffer = StalenessBuffer(1, max_staleness=1)
    prompt = Prompt(7, [1, 2], {})

    def run_one(request):
        version = src.buffer.try_admit()
        assert version is not None
        asyncio.run(src._one(None, request, version))

    run_one(prompt)
    if mode == "finish":
        # Kept as generated; the behaviour version is the oldest policy that sampled a token.
        assert src._dropped_partial == 0 and src.buffer.queue_depth == 1
        (group,) = src.buffer.take(timeout=1)
        assert group.version == 0 and [s.sample_id for s in group.samples] == ["7-0", "7-1"]
        assert group.samples[0].metadata["weight_versions"] == [[0, 0, 2], [1, 2, 4]]
        return
    # Dropped, counted, its slot freed, and the prompt is served again before any new one.
    assert src._dropped_partial == 1 and src.buffer.queue_depth == 0 and src.buffer.running == 0
    again = src._next_prompt()
    assert again is prompt
    run_one(again)
    (group,) = src.buffer.take(timeout=1)
    assert group.version == 0 and client.calls == [7, 7]
    assert all(s.metadata["weight_versions"] == [[1, 0, 4]] for s in group.samples)
