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
optimizer: `fully_reshardable`). The per-rank RNG streams come back only under the same layout on
the same number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from ..patches.megatron_core_checkpoint import (prime_distributed_optimizer_state,
                                                threaded_torch_dist_save_strategy,
                                                torch_adam_step_tolerance)

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


def _format_metadata() -> dict:
    """How the sharded state dicts are laid out (saved as the checkpoint's content metadata, and
    read back so that the load builds the same layout)."""
    return {
        "singleton_local_shards": False,
        # The optimizer state keys are parameter keys; no `chained_{i}.` prefixes for MoE's
        # dense + expert optimizer chain, so the state does not depend on how params are grouped.
        "chained_optim_avoid_prefix": True,
        "distrib_optim_sharding_type": _DISTRIB_OPTIM_FORMAT,
        # The default gathers the distributed optimizer's shards with NCCL through `.cuda()`
        # tensors; without a GPU, gather them over the optimizer's gloo DP group instead (only DP
        # rank 0 then writes them; megatron reads both variants alike).
        "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available(),
    }


# The entries of the saved content metadata that decide the saved layout (the load mirrors them);
# the others choose how this machine exchanges data and come from `_format_metadata`.
_LAYOUT_METADATA = ("singleton_local_shards", "chained_optim_avoid_prefix",
                    "distrib_optim_sharding_type")


def _sharded_model_and_optimizer(learner, metadata: dict, is_loading: bool) -> dict:
    if is_loading:
        prime_distributed_optimizer_state(learner.optimizer)
    state = {key: _unwrap(chunk).sharded_state_dict(metadata=dict(metadata))
             for key, chunk in zip(_model_keys(learner), learner.chunks)}
    if not getattr(learner.optimizer, "is_stub_optimizer", False):
        state["optimizer"] = learner.optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=dict(metadata))
    return state


def _optimizer_structure(optimizer) -> list:
    """(class, param groups) of each optimizer megatron chains (dense, experts, ...): this
    structure depends on the layout (MoE experts get their own optimizer only with EP > 1)."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [[type(o).__name__, len(o.param_groups)] for o in subs]


def _tensors_into_template(template, loaded):
    """`template` with each sharded leaf replaced by the loaded value at the same place."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    if isinstance(template, ShardedBase):
        return loaded
    if isinstance(template, LocalNonpersistentObject):
        return template.unwrap()
    if isinstance(template, dict):
        return {k: _tensors_into_template(v, loaded[k]) if _has_sharded(v) else v
                for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        return type(template)(_tensors_into_template(v, loaded[i]) if _has_sharded(v) else v
                              for i, v in enumerate(template))
    return template


def _has_sharded(x) -> bool:
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    if isinstance(x, (ShardedBase, LocalNonpersistentObject)):
        return True
    if isinstance(x, dict):
        return any(_has_sharded(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_sharded(v) for v in x)
    return False


def _find_key(tree, key):
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        for v in tree:
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def _restructured_optimizer_state(template, loaded):
    """Optimizer state for this run's optimizer chain from a checkpoint saved by another chain.

    The per-parameter tensors are keyed by parameter (`chained_optim_avoid_prefix`), so the load
    fetched them for this chain; the checkpoint's non-tensor part (param groups, the Adam step)
    is shaped for the saving chain. Keep this optimizer's param groups (they carry the configured
    hyperparameters; the scheduler resets the lr) and put the saved step into each torch optimizer
    state.
    """
    state = _tensors_into_template(template, loaded)
    step = _find_key(loaded, "common_step")  # plain and mixed-precision optimizers
    if step is None:  # distributed optimizer: the step is in its param groups
        groups = _find_key(loaded, "param_groups") or []
        step = next((g["step"] for g in groups if "step" in g), None)
    if step is None:
        return state

    def put_step(tree):
        if isinstance(tree, dict):
            groups = tree.get("param_groups")
            if isinstance(groups, list) and any("step" in g for g in groups):
                for group in groups:  # distributed optimizer: torch Adam's step per group
                    group["step"] = step
            elif isinstance(groups, list) and isinstance(tree.get("state"), dict):
                tree["state"]["common_step"] = step  # what megatron's other optimizers read
            for v in tree.values():
                put_step(v)
        elif isinstance(tree, (list, tuple)):
            for v in tree:
                put_step(v)

    put_step(state)
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


def _save_strategy():
    """`torch_dist` (`patches.megatron_core_checkpoint`), with the writes of data-parallel replicas spread over the DP
    ranks by megatron's fully-parallel wrapper (each shard is written once)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper)

    strategy = threaded_torch_dist_save_strategy()
    dp = ps.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(dp) > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, dp)
    return strategy


# -- save -----------------------------------------------------------------------------------------


def prune_checkpoints(root: Union[str, Path], keep: int) -> list[str]:
    """Remove all but the newest `keep` checkpoint directories of `root` (never the one `latest`
    names); returns the names removed. `keep` 0 keeps all."""
    root = Path(root)
    if keep < 1:
        return []
    latest = latest_checkpoint(root)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    doomed = [p for p in steps[:-keep] if p != latest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in doomed]


def save_checkpoint(learner, root: Union[str, Path], extra_state: dict, keep: int = 0) -> Path:
    """Write `root/step_{policy_version:08d}/`, point `root/latest` at it and keep the newest
    `keep` checkpoints (0: all). Collective: every rank calls it (with the same `root` and
    `extra_state`); returns the checkpoint directory."""
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

    metadata = _format_metadata()
    state = _sharded_model_and_optimizer(learner, metadata, is_loading=False)
    state["rng_state"] = _sharded_rng(_rng_state())
    state["opt_param_scheduler"] = learner.scheduler.state_dict()
    state["policy_version"] = int(learner.policy_version)
    state["optimizer_structure"] = _optimizer_structure(learner.optimizer)
    state["extra_state"] = json.loads(json.dumps(extra_state))  # plain types: torch.load-safe
    dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy(),
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
        prune_checkpoints(root, keep)
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


def config_mismatches(saved: dict, model_cfg) -> list[tuple[str, object, object]]:
    """(field, saved value, this model's value) for every architecture field that differs."""
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
    found, error = None, None
    if _rank() == 0:  # one reading of `latest` for all ranks, even while another job writes it
        try:
            found = latest_checkpoint(root)
        except ValueError as e:
            error = str(e)
    found, error = _from_rank0((found, error))
    if error is not None:
        raise ValueError(error)
    if found is None:
        return None
    if not (Path(found) / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{Path(root) / LATEST} names {found}, which is not a complete "
                                f"checkpoint (no {CONFIG_FILE})")
    return load_checkpoint_dir(learner, found)


def load_checkpoint_dir(learner, path: Union[str, Path]) -> dict:
    """Restore one checkpoint directory (`root/step_N`) into `learner`; returns its `extra_state`.
    Collective; the same checks as `load_checkpoint`."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {CONFIG_FILE})")
    record = json.loads(config_file.read_text())
    _check_config(path, record, learner)

    saved_metadata = dist_checkpointing.load_content_metadata(str(path)) or {}
    metadata = {**_format_metadata(),
                **{k: saved_metadata[k] for k in _LAYOUT_METADATA if k in saved_metadata}}
    state = _sharded_model_and_optimizer(learner, metadata, is_loading=True)
    # Per-rank streams are only meaningful on the same ranks: under another layout a rank's
    # tensor-parallel stream would come from a rank with another TP rank (identical dropout masks
    # on TP peers). Then the freshly seeded streams stay, as megatron-LM's --no-load-rng would.
    here = {"layout": dataclasses.asdict(learner.layout), "world_size": _world()}
    same_ranks = all(record.get(k) == v for k, v in here.items())
    if same_ranks:
        state["rng_state"] = _sharded_rng(_rng_state())
    elif _rank() == 0:
        logger.warning("checkpoint %s was saved under %s on %s ranks, this run has %s on %s: its "
                       "per-rank RNG states are not restored", path, record.get("layout"),
                       record.get("world_size"), here["layout"], here["world_size"])
    loaded = dist_checkpointing.load(state, str(path))

    for key, chunk in zip(_model_keys(learner), learner.chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if "optimizer" in state:
        optimizer_state = loaded["optimizer"]
        if loaded.get("optimizer_structure") != _optimizer_structure(learner.optimizer):
            optimizer_state = _restructured_optimizer_state(state["optimizer"], optimizer_state)
        with torch_adam_step_tolerance(learner.optimizer):
            learner.optimizer.load_state_dict(optimizer_state)
    learner.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    learner.policy_version = int(loaded["policy_version"])
    if same_ranks:
        _set_rng_state(loaded["rng_state"])
    _barrier()
    return loaded["extra_state"]
