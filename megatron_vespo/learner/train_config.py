"""The `train:` section: how rollout batches become optimizer steps, and where a run writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

OLD_LOGPROBS = ("recompute", "engine")


@dataclass(frozen=True)
class TrainConfig:
    """Staleness N = rollout_batch_size / mini_batch_size: one rollout batch (one behaviour policy
    version) is consumed as N mini-batches updated in sequence, so the k-th update trains on data
    k-1 policy versions old (the paper's N = 4..64)."""

    rollout_batch_size: int = 16
    staleness: int = 1
    micro_batch_size: int = 4  # sequences per micro-batch per rank
    # Token budget per micro-batch: packed positions (padding included, before the CP split)
    # instead of a fixed sequence count; micro_batch_size is then unused. None: off.
    max_tokens_per_micro_batch: Optional[int] = None
    old_logprobs: str = "recompute"  # recompute once per rollout batch, or trust the engine's
    epochs: int = 1  # passes over an offline rollout file
    max_steps: int = 0  # stop after this step (inside a rollout batch too); 0: no limit
    seed: int = 1234
    logprob_chunk_tokens: int = 1024
    output_dir: str = "runs/default"
    save_interval: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 0  # newest checkpoints kept (a 30B-A3B one is ~0.4 TB); 0: all
    world_size: int = 1  # ranks spawned on this machine when not launched by torchrun / srun
    init_hf_checkpoint: Optional[str] = None  # HF directory to start from (else random init)
    # Optimizer steps between expert-load heat-maps (output_dir/routing/step_XXXXXXXX.png; needs
    # algorithm.routing_metrics); 0: never.
    heatmap_interval: int = 0
    # Optimizer steps between weight and phi histograms (online training, MLflow artifacts); 0: never.
    histogram_interval: int = 0
    # Optimizer steps between held-out evaluations (online training; greedy, one response per
    # eval prompt); 0: never.
    eval_interval: int = 0

    def __post_init__(self) -> None:
        for name in ("rollout_batch_size", "staleness", "micro_batch_size", "epochs",
                     "logprob_chunk_tokens", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_interval", "keep_checkpoints", "heatmap_interval",
                     "eval_interval", "histogram_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ValueError(f"max_tokens_per_micro_batch must be >= 1, got "
                             f"{self.max_tokens_per_micro_batch}")
        if self.rollout_batch_size % self.staleness:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) must be divisible by "
                             f"staleness ({self.staleness}): N mini-batches of equal size")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"old_logprobs={self.old_logprobs!r}; allowed: {list(OLD_LOGPROBS)}")

    @property
    def mini_batch_size(self) -> int:
        return self.rollout_batch_size // self.staleness
