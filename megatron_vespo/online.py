"""Online training: `megatron-vespo train CONFIG`. The rollout fleet as the trainer's source.

`FleetSource` is the source of samples the trainer (`trainer.py`) takes rollout batches from. Rank 0
owns the rollout side (the fleet, the task, the client); every rank takes part in the weight syncs.

  sync mode   each rollout batch is N x mini-batch samples generated with the current weights,
              trained as N steps; then the weights go to the fleet (one version per batch).
  async mode  each batch is one mini-batch from the staleness buffer (the producer keeps
              generating); every `rollout.sync_interval` steps the weights go to the fleet.
Evaluation runs on the fleet, on the task's evaluation sets (k responses per prompt at each set's
sampling), in the background: it shares the fleet with the next rollout batch while the learners
train, and the next weight update waits for it. The source's checkpoint state is the task's prompt
cursor.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

from .config import Config
from .learner.hf_convert import export_model_to_hf
from .learner.learner import Learner
from .learner.sample_files import recorded
from .learner.samples import RolloutBatch
from .rollout.auth import run_api_key, use_api_key
from .rollout.client import RolloutClient
from .rollout.evaluation import BackgroundEvaluation, evaluate_sets
from .rollout.fleet import Fleet, FleetError
from .rollout.server import is_healthy
from .rollout.source import RolloutSource
from .rollout.weight_sync import DiskWeightSync, DistributedWeightSync, name_version
from .tasks import build_task, load_tokenizer
from .trainer import broadcast_object, build_learner, train_rank

logger = logging.getLogger(__name__)


class FleetSource:
    """Rollout batches from the SGLang fleet (`trainer.SampleSource`)."""

    def __init__(self, config: Config, rank: int) -> None:
        import torch.distributed as dist

        self.config, self.rank = config, rank
        r = config.rollout
        self.sync_mode = r.mode == "sync"
        self.steps_per_batch = config.train.staleness if self.sync_mode else 1
        self.run_dir = Path(config.train.output_dir)
        self.control = dist.new_group(backend="gloo")
        if r.weight_sync == "disk":
            # Beside weights/initial and the Slurm servers' placeholders, which restarted servers
            # start from: the export replaces its whole directory.
            self.weights = DiskWeightSync(self.run_dir / "weights" / "synced",
                                          check=r.check_weight_update,
                                          shard_bytes=r.weight_bucket_mb << 20)
        else:
            self.weights = DistributedWeightSync(bucket_bytes=r.weight_bucket_mb << 20,
                                                 master_address=r.weight_sync_address,
                                                 check=r.check_weight_update)
        self.fleet: Optional[Fleet] = None
        self.rollout: Optional[RolloutSource] = None
        self.task = None
        self._task_state: Optional[dict] = None
        self._since_sync = 0
        self._version = 0  # the policy version the next rollout batch starts at
        self._eval = BackgroundEvaluation()  # rank 0
        self._eval_sets: list = []  # rank 0: the task's, tokenised once at start
        self._evaluated: list[tuple[int, dict]] = []  # finished, not yet handed to the trainer

    def start(self, learner: Learner) -> None:
        config, r, cfg = self.config, self.config.rollout, self.config.train
        self._version = learner.policy_version
        # The fleet starts from an HF directory: the initial checkpoint, or this learner's weights.
        model_path = cfg.init_hf_checkpoint
        chunks = [c.module for c in learner.chunks]
        if model_path is None or learner.policy_version > 0:
            model_path = str(self.run_dir / "weights" / "initial")
            export_model_to_hf(model_path, chunks, config.model, config.parallel, overwrite=True)
        use_api_key(run_api_key(self.run_dir))  # every pipeline stage's sender talks to the servers
        if self.rank == 0:
            tokenizer = load_tokenizer(config.task, cfg.init_hf_checkpoint)
            self.task = build_task(config.task, tokenizer)
            if self._task_state:
                self.task.load_state_dict(self._task_state)
            if r.fleet.attach_router_url:
                self.fleet = Fleet.attach(r.fleet)
            else:
                self.fleet = Fleet.launch(model_path, r.fleet, self.run_dir / "fleet", seed=cfg.seed)
            client = RolloutClient(
                self.fleet, r.sampling, n=r.n_samples_per_prompt,
                return_routed_experts=r.fleet.server.enable_routed_experts,
                num_moe_layers=config.model.num_hidden_layers if config.model.is_moe else 0,
                num_experts=config.model.num_experts or None,
                max_in_flight=r.max_in_flight, on_invalid=r.on_invalid)
            self.rollout = RolloutSource(r, client, self.task.train_prompts(), self.task.rewards,
                                         cfg.mini_batch_size // r.n_samples_per_prompt)
            self._eval_sets = self.task.eval_sets()
        if r.fleet.attach_router_url or r.weight_sync == "distributed":
            # Attached servers run whatever they started with; the distributed path names its version.
            self._sync(learner)
        elif self.rank == 0:  # launched from this learner's weights: name them before any request
            name_version(self.fleet.worker_urls, learner.policy_version)
        if self.rollout is not None and not self.sync_mode:
            self.rollout.start(learner.policy_version)

    def _sync(self, learner: Learner) -> None:
        """The weights to every member of the fleet and to every server that came back since the
        last sync (restarted), which then rejoins: it serves nothing older than this version. A
        server that dies during the sync is taken out (and brought back later) and the sync runs
        again without it; any other failure ends the run."""
        while True:
            members, back = broadcast_object(
                (self.fleet.worker_urls, self.fleet.returning()) if self.fleet else None,
                self.control)
            try:
                self.weights.sync([c.module for c in learner.chunks], self.config.model,
                                  self.config.parallel, members + back, learner.policy_version,
                                  fresh=back)
            except Exception as error:  # noqa: BLE001 - raised again unless a server died
                died = broadcast_object(self._died(back) if self.fleet else None, self.control)
                if not died:
                    raise
                if self.fleet is not None:
                    logger.warning("weight sync to version %d: %s died during it (%s); syncing "
                                   "again without it", learner.policy_version, died, error)
                continue
            break
        if self.fleet is not None and back:
            self.fleet.rejoin(back)

    def _died(self, back: list[str]) -> list[str]:
        """Rank 0: the members, and the returning servers `back`, found dead now (members are
        taken out; all are brought back later); [] when none is, or when no member is left."""
        try:
            dead = self.fleet.check_health()
        except FleetError:
            return []
        return dead + [url for url in back if not is_healthy(url)]

    def next_batch(self) -> Optional[RolloutBatch]:
        r = self.config.rollout
        if self.sync_mode:
            batch = self.rollout.rollout_batch(self.config.train.rollout_batch_size
                                               // r.n_samples_per_prompt)
        else:
            batch = self.rollout.take()
        if r.record:
            path = self.run_dir / "rollouts" / f"v{self._version:08d}.parquet"
            batch = replace(batch, groups=recorded(batch.groups, path,
                                                   self.config.model.num_experts or None))
        return batch

    def after_batch(self, learner: Learner) -> None:
        self._version = learner.policy_version
        if self.rollout is not None and not self.sync_mode:
            self.rollout.advance()
        self._since_sync += self.steps_per_batch
        if self.sync_mode or self._since_sync >= self.config.rollout.sync_interval:
            self._collect(wait=True)  # the weights it judges stay on the servers until it is done
            self._sync(learner)
            self._since_sync = 0

    def evaluate(self, step: int) -> None:
        r = self.config.rollout
        if self._eval_sets:
            self._eval.start(step, lambda: evaluate_sets(self.fleet, self._eval_sets, self.task.rewards,
                                                         r.sampling, r.max_in_flight))

    def _collect(self, wait: bool) -> None:
        if self._eval.running and (wait or self._eval.done):
            self._evaluated.append(self._eval.wait())

    def evaluations(self, wait: bool = False) -> list[tuple[int, dict]]:
        self._collect(wait)
        done, self._evaluated = self._evaluated, []
        return done

    def state_dict(self) -> dict:
        return {"task": self.task.state_dict()}

    def load_state_dict(self, state: Optional[dict]) -> None:
        self._task_state = (state or {}).get("task")

    def close(self) -> None:
        try:
            self.weights.close()
        finally:
            if self.rollout is not None:
                self.rollout.stop()
            if self.fleet is not None:
                self.fleet.shutdown()
            if self.task is not None:
                self.task.close()


def train_online_rank(rank: int, world_size: int, config: Config, resume: bool) -> dict:
    """One learner rank of online training; returns the last step's metrics."""
    learner = build_learner(config)
    return train_rank(rank, config, learner, FleetSource(config, rank), resume)
