"""Save and resume a `Learner` with megatron-core's distributed checkpointing.

A checkpoint is one directory `root/step_{policy_version:08d}/` in megatron's `torch_dist` format:

* sharded: every model chunk's `sharded_state_dict()` (under `model`, or `model0`, `model1`, ...
  with virtual pipeline stages), the optimizer's `sharded_state_dict` built on it, and the RNG
  states of every global rank (one `ShardedObject` shard per rank: the streams differ per rank);
* common (written once, by rank 0): the LR scheduler, `policy_version`, the caller's
  `extra_state` (its data cursor) and the format choices the load needs to mirror;
* `model_config.json` (rank 0): the model config, the parallel layout and the world size, read
  before any tensor so that loading into another model shape fails with a readable message.

Nothing half-written is ever visible: the directory is written under a hidden sibling name, renamed
into place once every rank has finished, and only then `root/latest` (a text file holding the
directory name) is replaced atomically. A crash before that leaves `latest` on the previous
checkpoint, and `load_checkpoint` only ever follows `latest`.

Tensor state reshards on load (another TP / PP / EP / DP split of the same model) as far as
megatron's `dist_checkpointing` reshards: model weights always, the optimizer state in the
per-parameter layout both optimizers write here (plain optimizer: model space; distributed
optimizer: `fully_reshardable`). The per-rank RNG streams only come back at the same world size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

LATEST = "latest"
CONFIG_FILE = "model_config.json"
_TMP_PREFIX = ".tmp_"
_OLD_PREFIX = ".old_"
# ModelConfig fields that choose how megatron realises the same weights, not which weights exist:
# a checkpoint written with one value loads under another.
_REALISATION_FIELDS = frozenset({"spec", "moe_token_dispatcher"})
# Distributed-optimizer state in megatron's per-parameter (model-space) layout: reshardable along
# every parallel dimension, unlike `dp_reshardable` (DP only).
_DISTRIB_OPTIM_FORMAT = "fully_reshardable"


def checkpoint_name(policy_version: int) -> str:
    return f"step_{policy_version:08d}"


# -- helpers ------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(value):
    """`value` as rank 0 sees it, on every rank."""
    if not dist.is_initialized() or _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old content or the new one, never a part."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _unwrap(chunk):
    """The GPTModel inside megatron's DDP (and Float16Module) wrappers."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def _model_keys(learner) -> list[str]:
    chunks = learner.chunks
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _format_metadata(learner) -> dict:
    """How the sharded state dicts are laid out (saved as the checkpoint's content metadata, and
    read back so that the load builds the same layout)."""
    return {
        "singleton_local_shards": False,
        # The optimizer state keys are parameter keys; no `chained_{i}.` prefixes for MoE's
        # dense + expert optimizer chain, so the state does not depend on how params are grouped.
        "chained_optim_avoid_prefix": True,
        "distrib_optim_sharding_type": _DISTRIB_OPTIM_FORMAT,
    }


def _sharded_model_and_optimizer(learner, metadata: dict, is_loading: bool) -> dict:
    state = {key: _unwrap(chunk).sharded_state_dict(metadata=dict(metadata))
             for key, chunk in zip(_model_keys(learner), learner.chunks)}
    if not getattr(learner.optimizer, "is_stub_optimizer", False):
        state["optimizer"] = learner.optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=dict(metadata))
    return state


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_rng(state: Optional[dict]):
    """This rank's RNG states as its shard of one object sharded over the global ranks (the way
    megatron-LM stores `rng_state`, there keyed by the (pp, tp) rank)."""
    from megatron.core.dist_checkpointing import ShardedObject

    return ShardedObject("rng_state", state, (_world(),), (_rank(),), replica_id=0)


def _config_record(learner) -> dict:
    return {
        "model": dataclasses.asdict(learner.model_cfg),
        "layout": dataclasses.asdict(learner.layout),
        "world_size": _world(),
    }


def _save_strategy(learner):
    """torch_dist (torch.distributed.checkpoint files, works over gloo on CPU), with each tensor
    shard written once across its data-parallel replicas by the fully-parallel wrapper."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper)

    strategy = get_default_save_sharded_strategy("torch_dist")
    dp = ps.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(dp) > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, dp)
    return strategy


# -- save -----------------------------------------------------------------------------------------


def save_checkpoint(learner, root: Union[str, Path], extra_state: dict) -> Path:
    """Write `root/step_{policy_version:08d}/` and point `root/latest` at it. Collective: every
    rank calls it (with the same `root` and `extra_state`); returns the checkpoint directory."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    name = checkpoint_name(learner.policy_version)
    final, tmp, old = root / name, root / f"{_TMP_PREFIX}{name}", root / f"{_OLD_PREFIX}{name}"
    json.dumps(extra_state)  # fail early, on every rank, if the cursor is not JSON-able

    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # what a crashed save of this step left behind
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()

    metadata = _format_metadata(learner)
    state = _sharded_model_and_optimizer(learner, metadata, is_loading=False)
    state["rng_state"] = _sharded_rng(_rng_state())
    state["opt_param_scheduler"] = learner.scheduler.state_dict()
    state["policy_version"] = int(learner.policy_version)
    state["extra_state"] = json.loads(json.dumps(extra_state))  # plain types: torch.load-safe
    dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy(learner),
                            content_metadata=metadata)

    if _rank() == 0:
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(_config_record(learner), f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # saving the same step again: swap the new one in
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, name + "\n")
        if old.exists():
            shutil.rmtree(old)
    _barrier()
    return final


# -- load -----------------------------------------------------------------------------------------


def latest_checkpoint(root: Union[str, Path]) -> Optional[Path]:
    """The directory `root/latest` names, or None when there is no `latest`."""
    root = Path(root)
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"{root / LATEST} names no checkpoint directory: {name!r}")
    return root / name


def config_mismatches(saved: dict, model_cfg) -> list[str]:
    """`field=saved` vs `field=current` for every architecture field that differs."""
    current = dataclasses.asdict(model_cfg)
    out = []
    for field in sorted(set(saved) | set(current)):
        if field in _REALISATION_FIELDS:
            continue
        if saved.get(field, "<absent>") != current.get(field, "<absent>"):
            out.append((field, saved.get(field, "<absent>"), current.get(field, "<absent>")))
    return out


def _check_config(path: Path, record: dict, learner) -> None:
    diffs = config_mismatches(record["model"], learner.model_cfg)
    if diffs:
        was = ", ".join(f"{f}={s!r}" for f, s, _ in diffs)
        now = ", ".join(f"{f}={c!r}" for f, _, c in diffs)
        raise ValueError(f"checkpoint {path} was saved for {was}, this model has {now}")


def load_checkpoint(learner, root: Union[str, Path]) -> Optional[dict]:
    """Restore the checkpoint `root/latest` names into `learner` (model, optimizer, scheduler, RNG,
    policy_version) and return its `extra_state`; None if there is no `latest`. Collective.

    Raises `ValueError` naming every differing field, before any tensor is touched, when the
    checkpoint was saved for another model shape.
    """
    from megatron.core import dist_checkpointing

    found = _from_rank0(latest_checkpoint(root))
    if found is None:
        return None
    path = Path(found)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{Path(root) / LATEST} names {path}, which is not a complete "
                                f"checkpoint (no {CONFIG_FILE})")
    record = json.loads(config_file.read_text())
    _check_config(path, record, learner)

    metadata = dist_checkpointing.load_content_metadata(str(path)) or _format_metadata(learner)
    state = _sharded_model_and_optimizer(learner, metadata, is_loading=True)
    same_world = record.get("world_size") == _world()
    if same_world:
        state["rng_state"] = _sharded_rng(_rng_state())
    else:
        logger.warning("checkpoint %s was saved by %s ranks, this run has %s: its per-rank RNG "
                       "states are not restored", path, record.get("world_size"), _world())
    loaded = dist_checkpointing.load(state, str(path))

    for key, chunk in zip(_model_keys(learner), learner.chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if "optimizer" in state:
        learner.optimizer.load_state_dict(loaded["optimizer"])
    learner.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    learner.policy_version = int(loaded["policy_version"])
    if same_world:
        _set_rng_state(loaded["rng_state"])
    _barrier()
    return loaded["extra_state"]
