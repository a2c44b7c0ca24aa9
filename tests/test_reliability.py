"""Reliability: a killed learner resumes exactly, bad log-probs are masked and counted, malformed
input is refused by name without leaving files behind, and the loss and packing functions survive
random shapes, masks and extreme log-ratios.

Covered elsewhere (checked to prove the bullet, not repeated here):

- a rollout server killed mid-batch: `tests/test_rollout_fleet.py::
  test_killing_a_server_mid_batch_loses_and_duplicates_nothing` SIGKILLs one of two real SGLang
  servers after a third of the groups; the batch completes with every (group, sample index) exactly
  once, through the client's retry path.
- MLflow stopped for part of a run: `tests/test_mlflow_tracking.py::
  test_outage_buffers_then_flushes_every_step_once_in_order` SIGKILLs a real `mlflow server`, logs
  six steps into the outage, restarts it and finds every step once, in order, in the same run.
- malformed config keys and values: `tests/test_config.py::test_bad_values_name_the_key` (unknown
  key, wrong type, out-of-range value, each named by its dotted key).
- malformed rollout rows: `tests/test_samples.py::test_bad_records_name_line_and_field` (wrong
  dtypes, missing and unknown fields, each named with file:line), and through the CLI, writing
  nothing: `tests/test_offline_train.py::test_bad_rollout_file_is_one_clear_error_and_writes_nothing`.
- HF checkpoints that do not match: `tests/test_hf_convert.py::test_architecture_mismatch_names_field`
  and `test_checkpoint_config_tensor_mismatch_names_tensor`.
- nothing half-written: `tests/test_samples.py::test_empty_file_and_atomic_write` (rollout file),
  `tests/test_hf_convert.py::test_failed_save_leaves_nothing` (HF export),
  `tests/test_checkpoint.py::test_a_save_that_dies_is_never_picked_up` (training checkpoint).
- per-loss NaN/inf masking on a fixed batch: `tests/test_policy_losses.py::
  test_nonfinite_log_probs_zero_the_sequence_and_are_counted`; the zigzag split round trip with
  one-token prompts: `tests/test_packing.py::test_cp_split_partitions_every_position_and_inverts`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_vespo import cli
from megatron_vespo.algo.importance import SequenceStats, local_sequence_sums
from megatron_vespo.algo.policy_losses import POLICY_LOSSES, PolicyLossInput, get_policy_loss
from megatron_vespo.learner.samples import write_samples
from megatron_vespo.parallel.packing import (PackedBatch, cp_shard, cp_unshard, pack_sequences,
                                             required_pad_multiple, zigzag_index)
from megatron_vespo.parallel.policy_objective import shard_policy_loss
from megatron_vespo.parallel.step_reduce import global_denominators
from megatron_vespo.tracking.jsonl import read_metrics
from tests.distributed import run_ranks
from tests.test_learner import make_samples

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny_moe_cpu.yaml")
VOCAB = 64  # configs/tiny_moe_cpu.yaml model.vocab_size


# --- a learner killed with SIGKILL resumes exactly ----------------------------------------------

STEPS = 8  # 32 samples = one rollout batch consumed as N = 8 steps of one group of 4
KILL_AFTER_STEPS = 3  # checkpoints every step: the kill falls inside the rollout batch


def train_command(run_dir: Path, rollouts: Path, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "megatron_vespo.cli", "train", CONFIG, f"train.output_dir={run_dir}",
            "train.rollout_batch_size=32", "train.staleness=8", "train.micro_batch_size=2",
            "train.world_size=1", "train.epochs=1", "train.max_steps=0", "train.save_interval=1",
            "--rollouts", str(rollouts)] + (["--resume"] if resume else [])


def read_consumed(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "samples_consumed.jsonl")


def kill_after(cmd: list[str], run_dir: Path, steps: int, timeout_s: float = 300.0) -> int:
    """Start `cmd` in its own process group, SIGKILL the group once `steps` metric rows exist;
    returns the exit status (-SIGKILL when it was killed mid-run)."""
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and len(read_metrics(metrics)) >= steps:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its spawned rank together
        proc.wait(timeout=60)
    return proc.returncode


@pytest.mark.slow
def test_sigkilled_learner_resumes_from_its_checkpoint_like_an_uninterrupted_run(tmp_path):
    """SIGKILL of the whole process group after 3 logged steps of a rollout batch of N = 8 steps;
    `--resume` restarts at the last checkpoint, inside the batch (its prepared micro-batches and old
    log-probs come back from the rollout bank, nothing is regenerated or recomputed), and from there
    every step's loss and grad norm equal the uninterrupted run's, on the same sample ids. Steps
    between the checkpoint and the kill are trained again and replace their first records: the
    run's history holds every step once (before: twice), and every sample of the file once."""
    rollouts = tmp_path / "rollouts.jsonl"
    samples = make_samples(n=4 * STEPS, vocab=VOCAB)
    write_samples(rollouts, samples)
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"

    done = subprocess.run(train_command(reference, rollouts), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert kill_after(train_command(crashed, rollouts), crashed, KILL_AFTER_STEPS) == -signal.SIGKILL

    before_kill = read_consumed(crashed)
    checkpoint = int((crashed / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 1 <= checkpoint <= len(before_kill) < STEPS  # inside the only rollout batch
    assert list((crashed / "rollout_bank").glob("rank_00000_v00000000.pt"))
    resumed = subprocess.run(train_command(crashed, rollouts, resume=True), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr

    assert f"resumed at step {checkpoint} from {crashed / 'checkpoints'}" in resumed.stderr
    want = {r["step"]: r for r in read_metrics(reference / "metrics.jsonl")}
    crashed_rows = read_metrics(crashed / "metrics.jsonl")
    assert [r["step"] for r in crashed_rows] == list(range(1, STEPS + 1))  # one history
    after = [r for r in crashed_rows if r["step"] > checkpoint]
    loss_diff = max(abs(r["loss"] - want[r["step"]]["loss"]) for r in after)
    grad_diff = max(abs(r["grad_norm"] - want[r["step"]]["grad_norm"]) for r in after)
    print(f"resumed at step {checkpoint + 1} (killed after {len(before_kill)} steps): "
          f"max |loss diff| {loss_diff:.3g}, max |grad_norm diff| {grad_diff:.3g}")
    assert loss_diff <= 1e-6 and grad_diff <= 1e-6

    want_ids = {r["step"]: r["sample_ids"] for r in read_consumed(reference)}
    consumed = read_consumed(crashed)
    assert [r["step"] for r in consumed] == list(range(1, STEPS + 1))
    survivor = {r["step"]: r["sample_ids"] for r in consumed}
    assert survivor == want_ids
    trained = Counter(i for ids in survivor.values() for i in ids)
    assert trained == Counter(s.sample_id for s in samples)  # each exactly once, none skipped


# --- NaN / inf engine log-probs are masked and counted; training goes on ---------------------------

NONFINITE = {1: float("nan"), 2: -float("inf"), 5: float("inf")}  # sample index -> a bad log-prob


def nonfinite_body(rank, world_size, cases, bad, clean):
    """Per case (config overrides): one rollout batch with bad engine log-probs, then a clean one;
    each step's metrics and whether every parameter is still finite afterwards."""
    from megatron_vespo.config import load_config
    from megatron_vespo.learner.batching import sample_advantages
    from megatron_vespo.rollout_batch import RankShare, prepare_rollout_batch, train_prepared_step
    from megatron_vespo.trainer import build_learner

    def train_batch(learner, config, batch, staleness):  # one rank holds the whole batch
        share = RankShare(list(batch), sample_advantages(batch, config.algorithm.advantage),
                          torch.arange(len(batch)) // (len(batch) // staleness))
        prepared = prepare_rollout_batch(learner, config, share, staleness,
                                         sum(s.reward for s in batch) / len(batch))
        return [train_prepared_step(learner, config, prepared, k) for k in range(staleness)]

    out = {}
    for name, overrides in cases.items():
        config = load_config(CONFIG, ["train.rollout_batch_size=8", "train.staleness=2",
                                      "train.micro_batch_size=2", *overrides])
        learner = build_learner(config)
        steps = [*train_batch(learner, config, bad, 2), *train_batch(learner, config, clean, 2)]
        finite = all(bool(torch.isfinite(p).all()) for c in learner.chunks for p in c.parameters())
        out[name] = {"steps": steps, "params_finite": finite,
                     "policy_version": learner.policy_version}
    return out


@pytest.mark.slow
def test_nonfinite_engine_logprobs_are_masked_counted_and_training_continues():
    """NaN, -inf and +inf engine log-probs in three samples, entering log W either as the old
    log-probs (train.old_logprobs=engine) or as the behaviour of the mismatch fold (recompute +
    correct_mismatch): each step drops exactly its bad sequences (is/nonfinite_seqs_zeroed), its
    loss and gradient norm stay finite, the update is applied, and the parameters stay finite
    through a following clean rollout batch."""
    # Engine log-probs near a fresh model's (uniform over the vocabulary): log W near 0, so the
    # kernel gives the valid sequences real weight and a zero gradient would mean masking too much.
    samples = [dataclasses.replace(s, engine_logprobs=[-math.log(VOCAB) + 0.05 * (j % 3 - 1)
                                                       for j in range(len(s.response_ids))])
               for s in make_samples(n=16, vocab=VOCAB)]
    bad = [dataclasses.replace(s, engine_logprobs=[NONFINITE[i], *s.engine_logprobs[1:]])
           if i in NONFINITE else s for i, s in enumerate(samples[:8])]
    cases = {"engine": ["train.old_logprobs=engine"],
             "mismatch_fold": ["train.old_logprobs=recompute", "algorithm.correct_mismatch=true"]}
    (results,) = run_ranks(nonfinite_body, 1, cases, bad, samples[8:])
    for name, r in results.items():
        # step 1 trains samples 0-3 (two bad), step 2 samples 4-7 (one bad), then clean steps
        assert [m["is/nonfinite_seqs_zeroed"] for m in r["steps"]] == [2, 1, 0, 0], name
        for m in r["steps"]:
            assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
            assert m["update_skipped"] == 0.0
        assert r["policy_version"] == 4 and r["params_finite"], name


# --- malformed input: named, refused before anything is written -----------------------------------


def run_cli(tmp_path, *overrides) -> int:
    rollouts = tmp_path / "rollouts.jsonl"
    write_samples(rollouts, make_samples(n=8, vocab=VOCAB))
    return cli.main(["train", CONFIG, f"train.output_dir={tmp_path / 'run'}", *overrides,
                     "--rollouts", str(rollouts)])


@pytest.mark.parametrize("override, message", [
    ("algorithm.vespo.c3=1", "algorithm.vespo.c3: unknown key"),
    ("train.save_interval=often", "train.save_interval: expected an integer"),
])
def test_bad_config_through_the_cli_names_the_key_and_writes_nothing(tmp_path, capsys, override,
                                                                     message):
    assert run_cli(tmp_path, override) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    # offline (a rollout file)
    (["train.world_size=4", "parallel.tp=4"], "parallel.tp (4) must divide model.num_key_value_heads (2)"),
    (["rollout.sampling.stop_token_ids=[5, 999]"],
     "stop_token_ids: [999] outside the vocabulary [0, model.vocab_size=64)"),
    (["rollout.sampling.max_new_tokens=100000"], "leaves no room for a prompt"),
    (["tracking.uri=ftp://x"], "MLflow cannot track to ftp://"),
    (["train.rollout_batch_size=16"], "has 8 samples, fewer than one rollout batch"),
    (["train.output_dir={tmp}/file/run", "train.rollout_batch_size=8", "train.staleness=1"],
     "cannot be written: Not a directory"),
    # online: the fleet and the task are checked before any rank or server starts
    (["--online", "rollout.fleet.server.dtype=fp8_e4m3"], "dtype='fp8_e4m3' needs a GPU"),
    (["--online", "task.name=math", "task.tokenizer_path=x", "task.data.path={tmp}/none.jsonl"],
     "none.jsonl: no such file"),
    (["--online", "task.name=math", "task.tokenizer_path=x", "task.data.path={tmp}/q.jsonl"],
     "q.jsonl:line 2: missing field 'prompt'"),
])
def test_bad_input_is_one_line_before_any_rank_starts(tmp_path, capsys, overrides, message):
    """Each of these used to fail inside every rank after the model was built (a traceback per
    rank, `weights/initial` left behind), or was accepted silently."""
    (tmp_path / "file").write_text("")
    (tmp_path / "q.jsonl").write_text('{"prompt": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    if "--online" in overrides:
        overrides.remove("--online")
        code = cli.main(["train", CONFIG, f"train.output_dir={tmp_path / 'run'}", *overrides])
    else:
        code = run_cli(tmp_path, *overrides)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_yaml_errors_name_the_file_and_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  staleness: [1\n  seed: 3\n")
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text("train:\n  staleness: 2\n  seed: 3\n  staleness: 4\n")
    for path, message in ((broken, f"{broken}:3: not valid YAML"),
                          (duplicate, f"{duplicate}:4: key 'staleness' given twice")):
        assert cli.main(["train", str(path), f"train.output_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_mismatched_hf_checkpoint_is_named_before_any_rank_starts(tmp_path, capsys):
    """An init checkpoint saved for another hidden size: the CLI names the field (config.json and
    tensor headers only) before spawning ranks, and no run directory appears."""
    from megatron_vespo.config import load_config
    from megatron_vespo.learner.hf_files import save_hf_checkpoint
    from megatron_vespo.learner.state_adapter import megatron_tensor_shapes, megatron_to_hf

    wide = dataclasses.replace(load_config(CONFIG).model, hidden_size=128)
    state = {n: torch.zeros(shape) for n, shape in megatron_tensor_shapes(wide).items()}
    save_hf_checkpoint(tmp_path / "hf", wide, megatron_to_hf(state, wide))
    assert run_cli(tmp_path, f"train.init_hf_checkpoint={tmp_path / 'hf'}") == 2
    err = capsys.readouterr().err
    assert "hidden_size: checkpoint has 128, model has 64" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_prompt_row_without_the_prompt_field_is_named(tmp_path):
    from megatron_vespo.tasks import (PromptDataConfig, PromptDataError, PromptDataset,
                                      build_tiny_tokenizer)

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n"
                    + json.dumps({"question": "2+2", "answer": "4"}) + "\n")
    with pytest.raises(PromptDataError, match=r"prompts\.jsonl:line 2: missing field 'prompt' "
                                              r"\(the row has fields \['answer', 'question'\]\)"):
        PromptDataset(path, build_tiny_tokenizer(), PromptDataConfig())


# --- fuzz: policy losses and packing ----------------------------------------------------------------

EXTREME = st.sampled_from([1e4, -1e4, 50.0, -50.0])
NONFINITE_VALUES = st.sampled_from([float("nan"), float("inf"), -float("inf")])


@st.composite
def loss_cases(draw):
    """Sequences with 1-4 prompt tokens and 0-8 response tokens; per response token a log-ratio
    that is small, extreme, or (in the behaviour log-probs, as a broken engine gives them)
    non-finite; advantages of either sign or zero; a CP degree and a micro-batch split point."""
    n = draw(st.integers(1, 5))
    prompts = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    responses = draw(st.lists(st.integers(0, 8), min_size=n, max_size=n))
    tokens, old, logp = [], [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens.append(torch.arange(p + r) % 50 + i)
        base = draw(st.lists(st.floats(-8.0, 0.0), min_size=r, max_size=r))
        d = draw(st.lists(st.one_of(st.floats(-3.0, 3.0), EXTREME), min_size=r, max_size=r))
        if r and draw(st.booleans()):  # about half the sequences carry one broken log-prob
            base[draw(st.integers(0, r - 1))] = draw(NONFINITE_VALUES)
        old.append(torch.tensor(base))
        logp.append(torch.tensor(base).nan_to_num(0.0, 0.0, 0.0) + torch.tensor(d))
    advantages = torch.tensor(draw(st.lists(st.sampled_from([-1.5, -0.3, 0.0, 0.7, 2.0]),
                                            min_size=n, max_size=n)))
    return dict(tokens=tokens, prompts=prompts, old=old, logp=logp, advantages=advantages,
                cp=draw(st.sampled_from([1, 2, 4])), split=draw(st.integers(1, n)))


def packed(case, lo: int, hi: int, pad: int) -> tuple[PackedBatch, torch.Tensor]:
    """Sequences lo..hi-1 packed, and their current-policy log-probs at the scored positions."""
    sel = slice(lo, hi)
    batch = pack_sequences(case["tokens"][sel], case["prompts"][sel], case["advantages"][sel],
                           case["old"][sel], pad_multiple=pad)
    logp = torch.zeros(batch.num_positions)
    logp[batch.loss_mask] = torch.cat(case["logp"][sel]).float()
    return batch, logp


def loss_and_grad(loss, batch, logp, denom):
    leaf = logp.clone().requires_grad_()
    out = shard_policy_loss(leaf, batch, denom, loss)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    return out, grad


def cp_loss_and_grad(loss, batch, logp, denom, cp):
    """The loss split over `cp` zigzag shards the way CP ranks compute it: local tokens plus the
    per-sequence sums added over the shards; returns the summed loss and the unsharded gradient."""
    shards = [cp_shard(batch, cp, r) for r in range(cp)]
    leaves = [logp[zigzag_index(batch.cu_seqlens_padded, cp, r)].clone().requires_grad_()
              for r in range(cp)]
    parts = [local_sequence_sums(leaf, s.old_logp, s.loss_mask, s.local_seq_lengths)
             for s, leaf in zip(shards, leaves)]
    seq = SequenceStats.from_sums(torch.stack([sums for sums, _ in parts]).sum(0))
    total = sum(loss(PolicyLossInput(leaf, s.old_logp, s.loss_mask, s.seq_index, s.advantages, seq,
                                     local, denom)).loss
                for s, leaf, (_, local) in zip(shards, leaves, parts))
    grads = torch.autograd.grad(total, leaves)
    return total, cp_unshard(list(grads), batch.cu_seqlens_padded)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    scale = max(float(a.abs().max()), float(b.abs().max()), 1.0) if a.numel() else 1.0
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=loss_cases())
def test_every_loss_is_finite_masks_nonfinite_sequences_and_is_split_invariant(name, case):
    """For random batches: the only error is the documented "no response tokens" when nothing is
    scored; otherwise loss and gradient are finite, sequences with a non-finite log-prob get zero
    gradient and are counted, and the loss and gradient do not change when the batch is split
    into two micro-batches or into CP zigzag shards. Except bapo's: its clip bounds are chosen on
    the tokens of the call, so the config allows it only where a step is one call."""
    loss = get_policy_loss(name)
    pad = required_pad_multiple(case["cp"])
    n, split = len(case["tokens"]), case["split"]
    batch, logp = packed(case, 0, n, pad)
    if not bool(batch.loss_mask.any()):
        with pytest.raises(ValueError, match="no response tokens"):
            global_denominators([batch], None)
        return
    denom = global_denominators([batch], None)
    out, grad = loss_and_grad(loss, batch, logp, denom)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()

    bad = [bool((~torch.isfinite(o)).any()) for o in case["old"]]
    assert out.metrics.finalize().get("is/nonfinite_seqs_zeroed", 0) == sum(bad)
    dead = torch.tensor(bad)[batch.seq_index] | ~batch.loss_mask
    assert grad[dead].eq(0).all()
    if name == "bapo":
        return

    parts = [packed(case, 0, split, pad), packed(case, split, n, pad)] if split < n else [(batch, logp)]
    results = [loss_and_grad(loss, b, lp, denom) for b, lp in parts]
    assert close(sum(o.loss for o, _ in results), out.loss)
    assert close(torch.cat([g for _, g in results]), grad)

    cp_total, cp_grad = cp_loss_and_grad(loss, batch, logp, denom, case["cp"])
    assert close(cp_total.detach(), out.loss.detach()) and close(cp_grad, grad)


@st.composite
def pack_cases(draw):
    """Random sequences (prompt length possibly out of range), log-probs including non-finite
    values, engine log-probs or none, and a CP x TP x SP layout."""
    n = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, 30), min_size=n, max_size=n))
    prompts = [draw(st.integers(0, L + 1)) for L in lengths]
    values = st.one_of(st.floats(-30.0, 0.0), NONFINITE_VALUES)
    old = [torch.tensor(draw(st.lists(values, min_size=max(L - p, 0), max_size=max(L - p, 0))))
           for L, p in zip(lengths, prompts)]
    engine = [o - 0.5 for o in old] if draw(st.booleans()) else None
    cp, tp = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2]))
    return dict(lengths=lengths, prompts=prompts, old=old, engine=engine, cp=cp, tp=tp,
                sp=tp > 1 and draw(st.booleans()))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal including NaNs (compared as bit patterns)."""
    if a.dtype.is_floating_point:
        return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a, b)


@settings(max_examples=80, deadline=None)
@given(case=pack_cases())
def test_packing_keeps_every_response_token_and_the_cp_split_inverts(case):
    """A prompt length outside [1, length] is the documented ValueError naming the sequence.
    Otherwise every response token is scored once at the position before it with its own log-probs
    (non-finite ones passed through untouched for the loss to mask), every sequence is padded to
    the layout's multiple, and the zigzag split is a partition that `cp_unshard` inverts."""
    tokens = [torch.arange(L) + 100 * i for i, L in enumerate(case["lengths"])]
    pad = required_pad_multiple(case["cp"], case["tp"], case["sp"])
    n = len(tokens)
    invalid = [i for i, (L, p) in enumerate(zip(case["lengths"], case["prompts"])) if not 1 <= p <= L]
    args = (tokens, case["prompts"], torch.linspace(-1, 1, n), case["old"], case["engine"])
    if invalid:
        with pytest.raises(ValueError, match=f"sequence {invalid[0]}: prompt length"):
            pack_sequences(*args, pad_multiple=pad)
        return
    batch = pack_sequences(*args, pad_multiple=pad)

    assert (torch.diff(batch.cu_seqlens_padded) % pad == 0).all()
    assert batch.response_lengths.tolist() == [L - p for L, p in zip(case["lengths"], case["prompts"])]
    mask = batch.loss_mask
    responses = [t[p:] for t, p in zip(tokens, case["prompts"])]
    assert torch.equal(batch.target_ids[mask], torch.cat(responses))
    assert same_bits(batch.old_logp[mask], torch.cat(case["old"]).float())
    if case["engine"] is not None:
        assert same_bits(batch.engine_logp[mask], torch.cat(case["engine"]).float())

    cp = case["cp"]
    shards = [cp_shard(batch, cp, r) for r in range(cp)]
    index = torch.cat([zigzag_index(batch.cu_seqlens_padded, cp, r) for r in range(cp)])
    assert sorted(index.tolist()) == list(range(batch.num_positions))
    if case["sp"]:
        assert all(s.num_positions % case["tp"] == 0 for s in shards)
    for field in PackedBatch.PER_POSITION:
        if getattr(batch, field) is None:
            continue
        restored = cp_unshard([getattr(s, field) for s in shards], batch.cu_seqlens_padded)
        assert same_bits(restored, getattr(batch, field)), field


# --- the local launcher: no time limit of its own, fails fast -------------------------------------

def one_rank_fails(rank, world_size):
    if rank == 1:
        raise RuntimeError("rank 1 gives up")
    time.sleep(600)  # rank 0 would wait for rank 1 in its next collective, forever


def test_the_launcher_fails_as_soon_as_one_rank_fails():
    """Before: the launcher joined rank 0 first with a one-hour timeout (world_size hours in all),
    then SIGKILLed whatever still ran. Now it returns when a rank fails, and stops the rest."""
    from megatron_vespo.launch import RankFailure, run_ranks as launch

    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 gives up"):
        launch(one_rank_fails, 2)  # no timeout: the product's own call
    assert time.monotonic() - start < 120


def meet_then_wait(rank, world_size, flags):
    """The addresses this rank's process listens on once every rank has met; then rank 0 waits in a
    barrier until the test has signalled both ranks (rank 1 joins it after that)."""
    import psutil
    import torch.distributed as dist

    dist.barrier()
    addresses = sorted({c.laddr.ip for c in psutil.Process().net_connections("tcp")
                        if c.status == psutil.CONN_LISTEN})
    (flags / f"ready{rank}").touch()
    while rank == 1 and not (flags / "signalled").exists():
        time.sleep(0.05)
    dist.barrier()
    return addresses


def test_local_ranks_listen_on_no_wildcard_address_and_print_stacks_on_signal(tmp_path, capfd):
    """Before: the ranks met at a TCP store that listened on every interface without a key.
    `kill -USR2` on a stuck run: each rank prints all its threads' stacks, rank 0 from inside the
    collective it is blocked in, and both carry on."""
    import threading

    import psutil

    from megatron_vespo.launch import STACKS_SIGNAL, run_ranks as launch

    result = []
    thread = threading.Thread(target=lambda: result.extend(launch(meet_then_wait, 2, tmp_path,
                                                                  timeout=300)))
    thread.start()
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1)  # rank 0 is inside the barrier
    for child in psutil.Process().children():
        if "spawn_main" in " ".join(child.cmdline()):
            child.send_signal(STACKS_SIGNAL)
            time.sleep(1)  # one at a time: both ranks write to one stderr
    time.sleep(1)
    (tmp_path / "signalled").touch()
    thread.join(120)
    assert len(result) == 2
    for addresses in result:
        assert not {"0.0.0.0", "::"} & set(addresses), addresses
    err = capfd.readouterr().err
    assert err.count("in meet_then_wait") == 2, err[-3000:]
    assert "barrier" in err


def test_a_run_directory_has_one_trainer_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    from megatron_vespo.run_lock import RunDirInUse, RunDirLock

    with RunDirLock(tmp_path / "run"):
        with pytest.raises(RunDirInUse, match=rf"in use by pid {os.getpid()} on "):
            RunDirLock(tmp_path / "run").__enter__()
    assert (tmp_path / "run" / ".lock").read_text() == ""  # a clean exit names no holder
    (tmp_path / "run" / ".lock").write_text("pid 999999999 on elsewhere")  # its holder died
    with RunDirLock(tmp_path / "run"):
        pass
    assert "pid 999999999 on elsewhere held" in capsys.readouterr().err
