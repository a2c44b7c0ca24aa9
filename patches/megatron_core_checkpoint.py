"""megatron-core 0.16.1 distributed checkpointing without TransformerEngine or Apex (torch Adam),
and its save strategy on any machine: three workarounds, each with a probe that is True while the
upstream gap is present (`tests/test_patches.py` runs them) and a note on when to delete it.

The learner's checkpoint code (`learner/checkpoint.py`) calls these; nothing here is applied at
import time, and each is a no-op where its gap is absent.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch

UPSTREAM_VERSION = "0.16.1"


def _distrib_optimizer():
    from megatron.core.optimizer import distrib_optimizer as dopt

    return dopt


# -- 1. a never-stepped optimizer has no Adam state to load into ----------------------------------


def probe_unprimed_adam_state() -> bool:
    """`DistributedOptimizer.state_dict` (torch Adam path) reads the step from every parameter's
    Adam state, and asserts there is one: a never-stepped optimizer has none."""
    dopt = _distrib_optimizer()
    source = inspect.getsource(dopt.DistributedOptimizer.state_dict)
    return not dopt.HAVE_APEX_OR_TE and 's["step"].item()' in source


def prime_distributed_optimizer_state(optimizer) -> None:
    """Give a never-stepped distributed optimizer an Adam state (zeros, step 0) to load into.
    Upstream: the loading `sharded_state_dict` calls `state_dict()` before it would initialise the
    state. Delete when `probe_unprimed_adam_state()` is False (megatron initialises the state
    first, or reads the step from the param groups)."""
    dopt = _distrib_optimizer()
    if dopt.HAVE_APEX_OR_TE:
        return
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, dopt.DistributedOptimizer) or sub.init_state_fn is None:
            continue
        inner = sub.optimizer
        if all(len(inner.state[p]) > 0 for g in inner.param_groups for p in g["params"]):
            continue
        sub.init_state_fn(inner, sub.config)
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.tensor(0.0))


# -- 2. one shared `step` tensor, and a KeyError on loading it ------------------------------------


def probe_shared_adam_step() -> bool:
    """`DistributedOptimizer.load_state_dict` (torch Adam path) gives every parameter's state the
    same `step` tensor object, and `_set_main_param_and_optimizer_states` then copies a `step` the
    checkpoint does not hold per parameter."""
    dopt = _distrib_optimizer()
    load = inspect.getsource(dopt.DistributedOptimizer.load_state_dict)
    copy = inspect.getsource(dopt.DistributedOptimizer._set_main_param_and_optimizer_states)
    return (not dopt.HAVE_APEX_OR_TE and 's["step"] = step' in load
            and "dst_tensors[key].copy_(tensors[key])" in copy)


@contextmanager
def torch_adam_step_tolerance(optimizer):
    """Let megatron's distributed optimizer load its parameter state into torch's Adam.

    Upstream (torch Adam path): `load_state_dict` 1. gives torch Adam's per-parameter state one
    `step` tensor, the same object for every parameter, so each later Adam step increments it once
    per parameter and the bias correction after a resume is wrong; 2. copies the checkpoint's
    per-parameter tensors into every entry of that state, `step` included: KeyError 'step'.
    Here, for the duration of the load, the per-parameter copy is given the `step` already
    restored (an instance attribute: the class and other optimizers are untouched); afterwards
    each parameter gets its own copy of it. Delete when `probe_shared_adam_step()` is False.
    """
    dopt = _distrib_optimizer()
    subs = [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(o, dopt.DistributedOptimizer)]
    if dopt.HAVE_APEX_OR_TE or not subs:
        yield
        return

    def tolerant(sub, original):
        def set_states(model_param, tensors):
            group, order = sub.model_param_group_index_map[model_param]
            state = sub.optimizer.state[sub.optimizer.param_groups[group]["params"][order]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            return original(model_param, tensors)
        return set_states

    for sub in subs:
        sub._set_main_param_and_optimizer_states = tolerant(
            sub, sub._set_main_param_and_optimizer_states)
    try:
        yield
    finally:
        for sub in subs:
            del sub._set_main_param_and_optimizer_states
    for sub in subs:
        for state in sub.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


# -- 3. the synchronous torch_dist save forks writer processes ------------------------------------


def probe_forking_torch_dist_save() -> bool:
    """megatron's synchronous `TorchDistSaveShardedStrategy.save` runs its asynchronous writer in
    place, which forks one writer process per file."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    source = inspect.getsource(mcore_torch.TorchDistSaveShardedStrategy.save)
    return "async_save" in source or "async_request" in source


def threaded_torch_dist_save_strategy():
    """megatron's `torch_dist` save strategy, written by torch's own `FileSystemWriter` (threads).

    Forked from a rank whose gloo and torch threads are running, megatron's writer children can
    deadlock (seen on CPU: they wait on a futex forever), and each fork of a large process costs
    seconds. The files and `.metadata` written here are the same `torch_dist` format (same key
    translation and planner), so megatron's load strategy reads them unchanged. Delete when
    `probe_forking_torch_dist_save()` is False (the synchronous save writes in-process).
    """
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class ThreadedTorchDistSaveStrategy(mcore_torch.TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            sharded_state_dict, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(sharded_state_dict, False)
            dcp_save(pyt_state_dict,
                     storage_writer=FileSystemWriter(checkpoint_dir, thread_count=self.thread_count,
                                                     sync_files=True),
                     planner=mcore_torch.MCoreSavePlanner(
                         dedup_replicated_tensors=not self.keep_only_main_replica,
                         flatten_state_dict=False))

    return ThreadedTorchDistSaveStrategy("torch_dist", 1, thread_count=1)


PROBES = {
    "unprimed_adam_state": probe_unprimed_adam_state,
    "shared_adam_step": probe_shared_adam_step,
    "forking_torch_dist_save": probe_forking_torch_dist_save,
}
