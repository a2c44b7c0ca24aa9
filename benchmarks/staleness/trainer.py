"""Supervised warm-up and the staleness-N RL loop of one sweep cell.

The RL loop is the product's synchronous schedule: every N optimizer steps, policy version v
samples one rollout batch of N mini-batches (behaviour log-probs recorded at sampling); the batch
is consumed as N sequential optimizer steps, each on one mini-batch, with the behaviour log-probs
as the old log-probs, so the k-th step of a batch (k = 0..N-1) trains on samples k versions stale.
The mini-batch size is fixed, so every N runs the same number of steps on the same prompts.

The loss of a step is the learner's own path: `shard_policy_loss` (token log-ratios, per-sequence
log W, the registered policy loss with global token / sequence denominators) on a `PackedBatch`
built from the padded rollout, unsharded. Per-step diagnostics come from the same `algo` functions
(`importance`, `kernel.vespo_phi`, `metrics.sequence_metrics`) for every loss, so phi / W / ESS are
comparable across losses; for non-VESPO losses phi is what the default kernel would have applied.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from megatron_vespo.algo.advantages import group_relative_advantages
from megatron_vespo.algo.importance import SequenceStats, local_sequence_sums
from megatron_vespo.algo.kernel import KernelConstants, variance_bound_constant, vespo_phi
from megatron_vespo.algo.kernel_control import AdaptiveC2, KernelControlConfig, proposal_mean_w
from megatron_vespo.algo.metrics import sequence_metrics
from megatron_vespo.algo.policy_losses import Denominators, get_policy_loss
from megatron_vespo.parallel.packing import PackedBatch
from megatron_vespo.parallel.policy_objective import shard_policy_loss

from .policy import GruPolicy, PolicyConfig, Rollout, sample
from .task import MAX_NEW_TOKENS, PROMPT_LEN, CipherTask

ADAPTIVE = "vespo_adaptive"  # vespo with c2 driven by `kernel_control`, not a registry entry
LOSSES = ("vespo", ADAPTIVE, "grpo", "gspo", "sapo", "topr", "bapo")


@dataclass(frozen=True)
class StudyConfig:
    """Everything a cell shares with every other cell (only loss, N and seed vary)."""

    steps: int = 512              # optimizer steps per cell (a multiple of every N swept)
    prompts_per_step: int = 16    # G: prompts per mini-batch
    group_size: int = 8           # n: responses per prompt; mini-batch = G * n sequences
    lr: float = 1e-3
    grad_clip: float = 1.0
    eval_every: int = 16
    eval_size: int = 512
    scale_adv_by_std: bool = False
    warmup_lr: float = 3e-3
    warmup_batch: int = 128
    warmup_target: float = 0.2    # stop the supervised warm-up at this held-out accuracy
    warmup_max_steps: int = 3000
    warmup_check_every: int = 10
    control_budget: float = 1.0   # vespo_adaptive: C
    control_step_size: float = 1.0
    control_c2_min: float = 0.5
    control_c2_max: float = 10.0
    policy: PolicyConfig = PolicyConfig()

    @property
    def control(self) -> KernelControlConfig:
        return KernelControlConfig(self.control_budget, self.control_step_size,
                                   self.control_c2_min, self.control_c2_max)


@torch.no_grad()
def held_out_accuracy(policy: GruPolicy, task: CipherTask, items: np.ndarray) -> float:
    """Greedy exact-match accuracy on held-out items [P]."""
    roll = sample(policy, task.prompts(items), MAX_NEW_TOKENS, task.eos_id, task.pad_id, None,
                  greedy=True)
    return float(task.reward(roll.responses(PROMPT_LEN), items).mean())


def warm_up(task: CipherTask, cfg: StudyConfig, seed: int,
            log: Callable[[str], None] = print) -> tuple[GruPolicy, float, int]:
    """Supervised warm-up on training items until held-out accuracy reaches `warmup_target`.

    Returns (policy, held-out accuracy, steps taken). Deterministic in `seed`.
    """
    torch.manual_seed(seed)
    policy = GruPolicy(task.vocab_size, cfg.policy)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.warmup_lr)
    items = task.train_items(cfg.warmup_max_steps * cfg.warmup_batch, seed + 1_000_003)
    eval_items = task.held_out_items(cfg.eval_size)
    acc, step = held_out_accuracy(policy, task, eval_items), 0
    while acc < cfg.warmup_target and step < cfg.warmup_max_steps:
        chunk = items[step * cfg.warmup_batch:(step + 1) * cfg.warmup_batch]
        tokens = torch.cat([task.prompts(chunk), task.answers(chunk)], 1)
        loss = -policy.token_logprobs(tokens)[:, PROMPT_LEN - 1:].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % cfg.warmup_check_every == 0:
            acc = held_out_accuracy(policy, task, eval_items)
    log(f"warm-up seed {seed}: {step} supervised steps, held-out greedy accuracy {acc:.3f}")
    return policy, acc, step


def _packed(roll: Rollout, advantages: Tensor) -> PackedBatch:
    """The padded mini-batch [B, L-1] as one packed, unsharded batch (one row per sequence)."""
    b, width = roll.mask.shape
    cu = torch.arange(b + 1, dtype=torch.int32) * width
    targets = roll.tokens[:, 1:].reshape(-1)
    return PackedBatch(
        input_ids=roll.tokens[:, :-1].reshape(-1),
        target_ids=targets,
        loss_mask=roll.mask.reshape(-1),
        old_logp=roll.behaviour_logp.reshape(-1),
        engine_logp=None,
        position_ids=torch.arange(width).repeat(b),
        seq_index=torch.arange(b).repeat_interleave(width),
        cu_seqlens=cu,
        cu_seqlens_padded=cu,
        response_lengths=roll.mask.sum(1),
        advantages=advantages,
    )


def _diagnostics(logp: Tensor, batch: PackedBatch,
                 constants: KernelConstants) -> tuple[dict, Tensor, SequenceStats]:
    """phi / log W / ESS statistics of one mini-batch [T] and the phi [S] of `constants`; also
    is/w_ess, the normalised ESS (sum W)^2 / (S sum W^2) of plain sequence importance sampling."""
    sums, _ = local_sequence_sums(logp.detach(), batch.old_logp, batch.loss_mask,
                                  batch.local_seq_lengths)
    seq = SequenceStats.from_sums(sums)
    phi = torch.where(seq.valid, vespo_phi(seq.log_w, batch.advantages, **asdict(constants)), 0.0)
    k = (variance_bound_constant(*constants.for_sign(True)),
         variance_bound_constant(*constants.for_sign(False)))
    stats = sequence_metrics(seq, batch.advantages, phi, k).finalize()
    w = torch.where(seq.valid, seq.log_w.double().exp(), 0.0)
    stats["is/w_ess"] = float(w.sum() ** 2 / (seq.valid.sum() * (w * w).sum()).clamp(min=1e-300))
    return stats, phi, seq


def train_cell(task: CipherTask, cfg: StudyConfig, warm: GruPolicy, loss_name: str, n: int,
               seed: int, on_step: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """RL-train a copy of `warm` with `loss_name` at staleness `n`; returns one row per step.

    Rows hold `step`, `staleness` (versions behind), the train reward, the loss's own metrics and
    the diagnostics; every `eval_every` steps (and at step 0 and the last step) `acc`, the greedy
    held-out accuracy. `on_step(step, row)` is called after each step (logging).
    """
    if cfg.steps % n:
        raise ValueError(f"steps={cfg.steps} must be a multiple of N={n}")
    policy = copy.deepcopy(warm)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    registry_name = "vespo" if loss_name == ADAPTIVE else loss_name
    policy_loss = get_policy_loss(registry_name)
    control = AdaptiveC2()
    mb = cfg.prompts_per_step * cfg.group_size
    # Same prompts in the same order for every loss and N: one draw per seed, sliced by step.
    items = task.train_items(cfg.steps * cfg.prompts_per_step, seed)
    eval_items = task.held_out_items(cfg.eval_size)
    sampler = torch.Generator().manual_seed(seed)
    rows: list[dict] = []
    step = 0
    while step < cfg.steps:
        batch_items = items[step * cfg.prompts_per_step:(step + n) * cfg.prompts_per_step]
        group_items = np.repeat(batch_items, cfg.group_size, axis=0)
        roll = sample(policy, task.prompts(group_items), MAX_NEW_TOKENS, task.eos_id, task.pad_id,
                      sampler)
        rewards = task.reward(roll.responses(PROMPT_LEN), group_items)
        groups = torch.arange(len(batch_items)).repeat_interleave(cfg.group_size)
        advantages = group_relative_advantages(rewards, groups, scale_by_std=cfg.scale_adv_by_std)
        for k in range(n):
            row = {"step": step, "staleness": k}
            if step % cfg.eval_every == 0:
                row["acc"] = held_out_accuracy(policy, task, eval_items)
            t0 = time.perf_counter()
            rows_k = slice(k * mb, (k + 1) * mb)
            mini = roll.select(rows_k)
            batch = _packed(mini, advantages[rows_k])
            logp = policy.token_logprobs(mini.tokens).reshape(-1)
            constants = control.constants
            stats, phi, seq = _diagnostics(logp, batch, constants)
            params = constants if registry_name == "vespo" else None
            denom = Denominators(tokens=float(batch.loss_mask.sum()), sequences=float(mb))
            out = shard_policy_loss(logp, batch, denom, policy_loss, params)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip))
            opt.step()
            row.update(out.metrics.finalize())
            row.update(stats)
            row["reward"] = float(rewards[rows_k].mean())
            row["c2_pos"], row["c2_neg"] = constants.c2_pos, constants.c2_neg
            if loss_name == ADAPTIVE:
                # A = 0 sequences carry no gradient, so they do not steer the kernel.
                adv = batch.advantages
                row["eq_w_pos"] = proposal_mean_w(phi, seq.log_w, seq.valid & (adv > 0))
                row["eq_w_neg"] = proposal_mean_w(phi, seq.log_w, seq.valid & (adv < 0))
                control = control.update(cfg.control, row["eq_w_pos"], row["eq_w_neg"])
            row["step_s"] = time.perf_counter() - t0
            rows.append(row)
            if on_step is not None:
                on_step(step, row)
            step += 1
    rows.append({"step": cfg.steps, "acc": held_out_accuracy(policy, task, eval_items)})
    if on_step is not None:
        on_step(cfg.steps, rows[-1])
    return rows
