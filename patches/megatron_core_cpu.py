"""CPU shim for megatron-core 0.16.1: bridges the CUDA-only spots that stop a local-spec
(non-TransformerEngine) `GPTModel`, dense or MoE, from training on CPU over gloo.

Each gap is one `Patch(name, probe, apply)` in `PATCHES`:

* `probe()` exercises the upstream behaviour and returns True while the gap is present (the call
  fails on a CPU-only build), False once it works. It has no lasting side effects.
* `apply()` monkeypatches the narrowest module attributes that bridge the gap; idempotent.

`apply_all()` (called by `megatron_vespo.patches.apply_cpu_patches`) applies every patch. Nothing
here edits site-packages; every replacement is written for this project. See README.md next to this
file for what each patch works around and when it can be deleted.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import types
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch.overrides import TorchFunctionMode

UPSTREAM_VERSION = "0.16.1"  # megatron-core release every patch below was written against

# Set on every replacement object, so that `apply()` can tell its own work from upstream's.
_MARK = "__megatron_vespo_cpu_shim__"


def _mark(obj):
    setattr(obj, _MARK, True)
    return obj


def _is_marked(obj) -> bool:
    return getattr(obj, _MARK, False)


def _raises(fn: Callable[[], object]) -> bool:
    """True if `fn()` raises: the probes' way of saying "the upstream behaviour is broken here"."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - any failure of the upstream call means the gap is present
        return True
    return False


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, torch.device) and device.type == "cuda"


# --------------------------------------------------------------------------------------------
# 1. torch.cuda.current_device
# --------------------------------------------------------------------------------------------


def _cpu_current_device() -> torch.device:
    """Stand-in for `torch.cuda.current_device()` on a CPU-only process: the CPU device."""
    return torch.device("cpu")


_mark(_cpu_current_device)


def probe_current_device() -> bool:
    """Gap present if `torch.cuda.current_device()` cannot name a device for a new tensor."""
    return _raises(lambda: torch.empty(1, device=torch.cuda.current_device()))


def apply_current_device() -> None:
    """megatron-core 0.16.1 allocates with `device=torch.cuda.current_device()` throughout:
    `distributed/param_and_grad_buffer.py` (`_ParamAndGradBuffer.__init__`: the DDP param/grad
    buffers), `tensor_parallel/layers.py` (`ColumnParallelLinear`/`RowParallelLinear`/
    `VocabParallelEmbedding.__init__` weights when `use_cpu_initialization=False`),
    `tensor_parallel/mappings.py` (sequence-parallel all-gather / reduce-scatter outputs,
    `_AllToAll.forward`), `pipeline_parallel/p2p_communication.py` (`_communicate` receive
    buffers and shape tensors), `transformer/moe/router.py` / `experts.py`, ... On a CPU-only
    torch build `torch.cuda.current_device()` raises "Torch not compiled with CUDA enabled".

    Shim: `torch.cuda.current_device` returns `torch.device("cpu")`, which every one of those call
    sites accepts as `device=` / `.to(...)`. It is patched on `torch.cuda` itself because megatron
    reaches it as `torch.cuda.current_device()` from 25+ modules; it is only installed when
    `torch.cuda.is_available()` is False.
    """
    if not _is_marked(torch.cuda.current_device):
        torch.cuda.current_device = _cpu_current_device


# --------------------------------------------------------------------------------------------
# 2. CUDA streams, events and torch.cuda.synchronize
# --------------------------------------------------------------------------------------------


class CpuEvent:
    """A CUDA event stand-in: CPU work is synchronous, so every event has already happened."""

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class CpuStream:
    """A CUDA stream stand-in: one in-order CPU queue, so waits and syncs are no-ops.

    `torch.cuda.stream(CpuStream())` is already a no-op context on a CPU-only build (torch's
    `StreamContext` returns early when no CUDA device index exists), so it needs no patch.
    """

    device = torch.device("cpu")

    def __init__(self, device=None, priority: int = 0, **kwargs) -> None:
        self.priority = priority

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_DEFAULT_STREAM = CpuStream()


def _cpu_current_stream(device=None) -> CpuStream:
    return _CPU_DEFAULT_STREAM


def _cpu_synchronize(device=None) -> None:
    pass


for _fn in (CpuStream, CpuEvent, _cpu_current_stream, _cpu_synchronize):
    _mark(_fn)


def probe_streams() -> bool:
    """Gap present if megatron's stream idiom (side stream, wait, event, synchronize) fails."""

    def idiom():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            pass
        side.record_event().synchronize()
        torch.cuda.default_stream().wait_stream(side)
        torch.cuda.synchronize()

    return _raises(idiom)


def apply_streams() -> None:
    """megatron-core 0.16.1 uses CUDA streams/events as ordering primitives on paths that CPU
    training reaches: `transformer/moe/token_dispatcher.py` (`MoEAlltoAllTokenDispatcher.__init__`
    creates `torch.cuda.Stream()` as its device-to-host stream; `_maybe_dtoh_and_synchronize` uses
    `torch.cuda.current_stream()`, `wait_stream`, `record_event()` and `Event.synchronize()`),
    `pipeline_parallel/p2p_communication.py` (`P2PCommunicator._communicate` and
    `_communicate_shapes` call `torch.cuda.synchronize()` after batched isend/irecv),
    `distributed/param_and_grad_buffer.py` / `distributed_data_parallel.py` (communication stream
    with several distributed-optimizer instances). On a CPU-only build `torch.cuda.Stream` and
    `torch.cuda.Event` are dummy classes that raise, and `current_stream`, `default_stream` and
    `synchronize` raise "Torch not compiled with CUDA enabled".

    Shim: `torch.cuda.Stream` / `Event` become `CpuStream` / `CpuEvent` (no-op waits and syncs:
    CPU ops and gloo collectives complete in program order), `current_stream` / `default_stream`
    return one shared `CpuStream`, and `synchronize` is a no-op.
    """
    if _is_marked(torch.cuda.synchronize):
        return
    torch.cuda.Stream = CpuStream
    torch.cuda.Event = CpuEvent
    torch.cuda.current_stream = _cpu_current_stream
    torch.cuda.default_stream = _cpu_current_stream
    torch.cuda.synchronize = _cpu_synchronize


# --------------------------------------------------------------------------------------------
# 3. The CUDA RNG tracker
# --------------------------------------------------------------------------------------------


def _random_module():
    return importlib.import_module("megatron.core.tensor_parallel.random")


def _make_cpu_rng_tracker_class(upstream_cls):
    class CpuRNGStatesTracker(upstream_cls):
        """`CudaRNGStatesTracker` whose named states are CPU generator states.

        Same contract as upstream: `add(name, seed)` registers a state seeded with `seed` without
        disturbing the current stream; `fork(name)` runs its body on that state, saves where the
        state got to, and restores the stream that was current before.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"cpu rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"cpu rng state {name} is not added")
            outer_name = self._current_state_name
            outer_state = torch.get_rng_state()
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                if self._current_state_name != name:
                    raise Exception(
                        f"current rng state {self._current_state_name} is not the forked "
                        f"state {name}"
                    )
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    return _mark(CpuRNGStatesTracker)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    """`_get_cuda_rng_state` stand-in: the state of the CPU default generator."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False) -> None:
    """`_set_cuda_rng_state` stand-in: set the CPU default generator."""
    torch.set_rng_state(new_state)


_mark(_cpu_get_rng_state)
_mark(_cpu_set_rng_state)


def probe_rng_tracker() -> bool:
    """Gap present if a fresh megatron RNG tracker cannot add a state and fork it."""
    random = _random_module()

    def use_tracker():
        saved = torch.get_rng_state()
        try:
            tracker = random.CudaRNGStatesTracker()
            tracker.add("probe-rng", 1234)
            with tracker.fork("probe-rng"):
                torch.rand(1)
            random._set_cuda_rng_state(random._get_cuda_rng_state())
        finally:
            torch.set_rng_state(saved)

    return _raises(use_tracker)


def apply_rng_tracker() -> None:
    """megatron-core 0.16.1 `tensor_parallel/random.py`: `CudaRNGStatesTracker.add` reads and seeds
    the CUDA generator (`torch.cuda.get_rng_state`, `torch.cuda.manual_seed`), `fork` and the
    activation-recompute helpers go through `_get_cuda_rng_state` / `_set_cuda_rng_state`
    (`torch.cuda.default_generators`). So `model_parallel_cuda_manual_seed` raises on a CPU-only
    build, and every `get_cuda_rng_tracker().fork()` (parallel-linear/embedding weight init,
    dropout in tensor-parallel regions, expert init) would too.

    Shim: `random.CudaRNGStatesTracker` becomes a subclass whose tracked states are CPU generator
    states (`initialize_rng_tracker` looks the class up by that module attribute), and
    `_get_cuda_rng_state` / `_set_cuda_rng_state` read/write the CPU default generator. The
    tensor-model-parallel, expert-parallel and data-parallel seeds keep upstream's offsets. The
    "default" (data-parallel) stream is the CPU default generator, which `torch.manual_seed`
    seeds; upstream's `torch.cuda.manual_seed(seed)` inside `model_parallel_cuda_manual_seed`
    stays a queued no-op on CPU, so call `torch.manual_seed(seed)` (same seed on every rank)
    next to it. A tracker built before the patch is discarded so the next use rebuilds it.
    """
    random = _random_module()
    if _is_marked(random.CudaRNGStatesTracker):
        return
    random.CudaRNGStatesTracker = _make_cpu_rng_tracker_class(random.CudaRNGStatesTracker)
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    if random._CUDA_RNG_STATE_TRACKER is not None and not isinstance(
        random._CUDA_RNG_STATE_TRACKER, random.CudaRNGStatesTracker
    ):
        random._CUDA_RNG_STATE_TRACKER = None
        random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


# --------------------------------------------------------------------------------------------
# 4. torch norms under sequence parallelism
# --------------------------------------------------------------------------------------------


def _norm_probe_config(sequence_parallel: bool = True):
    # Exactly the fields WrappedTorchNorm.__new__ reads; a full TransformerConfig is not needed.
    return types.SimpleNamespace(
        layernorm_zero_centered_gamma=False,
        persist_layer_norm=False,
        sequence_parallel=sequence_parallel,
        memory_efficient_layer_norm=False,
        normalization="LayerNorm",
    )


def probe_norm_sequence_parallel() -> bool:
    """Gap present if the local-spec norm cannot be built for a sequence-parallel config, or is
    built without marking its parameters for the tensor-parallel gradient all-reduce."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    try:
        norm = WrappedTorchNorm(_norm_probe_config(), 8)
    except Exception:  # noqa: BLE001
        return True
    return not all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def apply_norm_sequence_parallel() -> None:
    """megatron-core 0.16.1 `transformer/torch_norm.py`: `WrappedTorchNorm.__new__` (the norm of
    `get_gpt_layer_local_spec` when Apex/TE are absent) asserts `not config.sequence_parallel`.
    Nothing about a torch LayerNorm/RMSNorm is wrong under sequence parallelism: each TP rank
    normalises its own sequence shard with a replicated weight; the only requirement is that the
    weight's gradient, which is partial per rank, is summed across the TP group. The fused norms
    (`fusions/fused_layer_norm.py`, TE) do that by tagging their parameters
    `sequence_parallel=True`, which `distributed/finalize_model_grads.py`
    (`_allreduce_non_tensor_model_parallel_grads`) all-reduces.

    Shim: wrap `WrappedTorchNorm.__new__`; for a sequence-parallel config it builds the same torch
    norm from a shallow config copy with `sequence_parallel=False` and tags the parameters
    `sequence_parallel=True`, as the fused norms do. Other configs go straight to upstream.
    """
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    upstream_new = WrappedTorchNorm.__new__
    if _is_marked(upstream_new):
        return

    def __new__(cls, config, *args, **kwargs):
        if not getattr(config, "sequence_parallel", False):
            return upstream_new(cls, config, *args, **kwargs)
        local_config = copy.copy(config)
        local_config.sequence_parallel = False
        norm = upstream_new(cls, local_config, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    functools.update_wrapper(__new__, upstream_new)
    WrappedTorchNorm.__new__ = staticmethod(_mark(__new__))


# --------------------------------------------------------------------------------------------
# 5. te_general_gemm unbound in the MoE router
# --------------------------------------------------------------------------------------------


def probe_router_te_general_gemm() -> bool:
    """Gap present if the router's gating GEMM cannot run forward (NameError without TE)."""
    from megatron.core.transformer.moe import moe_utils

    x = torch.ones(2, 4)
    w = torch.ones(3, 4)
    return _raises(lambda: moe_utils.router_gating_linear(x, w, None, torch.float32))


def apply_router_te_general_gemm() -> None:
    """megatron-core 0.16.1 `transformer/moe/moe_utils.py`: `te_general_gemm` is imported only
    inside the `try: import transformer_engine` block, yet `RouterGatingLinearFunction.forward`
    / `.backward` (used by `TopKRouter.gating` -> `router_gating_linear`) test
    `if te_general_gemm is not None`, so without TE every MoE forward raises
    `NameError: name 'te_general_gemm' is not defined` (an upstream bug).

    Shim: bind `moe_utils.te_general_gemm = None` when the name is missing, which selects the
    torch `mm`/`addmm` branch upstream already has (the same value
    `extensions/transformer_engine.py` gives it when TE lacks `general_gemm`).
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# --------------------------------------------------------------------------------------------
# 6. Alltoall split sizes left as tensors
# --------------------------------------------------------------------------------------------


def probe_alltoall_split_sizes() -> bool:
    """Gap present if the dispatcher's host-copy helper leaves a CPU split-size tensor a tensor
    when asked for a host (numpy) copy."""
    from megatron.core.transformer.moe import token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    return isinstance(splits, torch.Tensor)


def apply_alltoall_split_sizes() -> None:
    """megatron-core 0.16.1 `transformer/moe/token_dispatcher.py`:
    `MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize` turns `input_splits`,
    `output_splits` and `output_splits_tp` into host numpy arrays through
    `moe_utils.maybe_move_tensor_to_cpu(t, as_numpy=True)`, which only converts tensors that are
    `is_cuda`. On CPU they stay torch tensors and reach `torch.distributed.all_to_all_single`
    (via `tensor_parallel.all_to_all`) as split sizes, where the argument must be a sequence of
    ints.

    Shim: the dispatcher module's `maybe_move_tensor_to_cpu` binding is wrapped so that a CPU
    tensor asked for `as_numpy=True` is returned as a numpy array, the same host type the GPU
    path produces; everything else goes to upstream unchanged.
    """
    from megatron.core.transformer.moe import token_dispatcher

    upstream = token_dispatcher.maybe_move_tensor_to_cpu
    if _is_marked(upstream):
        return

    @functools.wraps(upstream)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return upstream(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = _mark(maybe_move_tensor_to_cpu)


# --------------------------------------------------------------------------------------------
# 7. device="cuda" literals
# --------------------------------------------------------------------------------------------

# Upstream modules that allocate with a literal device="cuda" on the CPU training path, and the
# function each literal sits in (megatron-core 0.16.1).
CUDA_LITERAL_MODULES: Tuple[Tuple[str, str], ...] = (
    (
        "megatron.core.pipeline_parallel.schedules",
        "forward_backward_no_pipelining / forward_backward_pipelining_*: total_num_tokens",
    ),
    (
        "megatron.core.transformer.utils",
        "get_default_causal_mask / get_sliding_window_causal_mask",
    ),
    (
        "megatron.core.transformer.moe.moe_utils",
        "track_moe_metrics(force_initialize=True): values of a loss name not yet recorded",
    ),
    (
        "megatron.core.optimizer.optimizer",
        "FP32Optimizer.__init__ (_scale), MixedPrecisionOptimizer.__init__ (found_inf, ...)",
    ),
    (
        "megatron.core.optimizer.clip_grads",
        "get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 / count_zeros_fp32",
    ),
    ("megatron.core.utils", "local_multi_tensor_l2_norm (the no-Apex grad-norm fallback)"),
)

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full")


class CpuDeviceTorch(types.ModuleType):
    """`torch`, as seen by one upstream module: identical except that the tensor factories
    (`tensor`, `zeros`, `ones`, `empty`, `full`) allocate on the CPU when asked for a CUDA
    device. Every other attribute is the real `torch` one."""

    def __init__(self) -> None:
        super().__init__("torch", "torch with device='cuda' factories redirected to the CPU")

    def __getattr__(self, name):
        return getattr(torch, name)


def _cpu_factory(name: str):
    real = getattr(torch, name)

    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return real(*args, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    return staticmethod(factory)


for _name in _FACTORIES:
    setattr(CpuDeviceTorch, _name, _cpu_factory(_name))
_mark(CpuDeviceTorch)


def probe_cuda_literals() -> bool:
    """Gap present if any listed module's `torch` cannot allocate with device="cuda"."""
    modules = [importlib.import_module(name) for name, _ in CUDA_LITERAL_MODULES]
    return any(
        _raises(lambda m=module: m.torch.zeros(1, dtype=torch.int, device="cuda"))
        for module in modules
    )


def apply_cuda_literals() -> None:
    """megatron-core 0.16.1 allocates small bookkeeping tensors with a literal `device="cuda"`
    (not `torch.cuda.current_device()`) in the modules listed in `CUDA_LITERAL_MODULES`: the
    token counter of every pipeline schedule (`pipeline_parallel/schedules.py`), the default
    causal mask (`transformer/utils.py`), the MoE metrics tracker that `track_moe_metrics`
    initialises (`transformer/moe/moe_utils.py`), the optimizer's loss-scale / found-inf
    tensors (`optimizer/optimizer.py`), the grad-norm buffers (`optimizer/clip_grads.py`) and the
    no-Apex multi-tensor L2 norm (`utils.py`). On a CPU-only build each of these raises
    "Torch not compiled with CUDA enabled".

    Shim: the module-level `torch` name of exactly those modules is replaced by a
    `CpuDeviceTorch` view, whose tensor factories map `device="cuda"` to the CPU and which
    forwards every other attribute to the real `torch`. Code in any other module, and all other
    torch calls in these modules, are untouched.
    """
    for name, _ in CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if not _is_marked(module.torch):
            module.torch = CpuDeviceTorch()


# --------------------------------------------------------------------------------------------
# 8. CUDA tensor-type strings in the optimizer (found while bridging; not in the original list)
# --------------------------------------------------------------------------------------------


class _CudaTypeNames(TorchFunctionMode):
    """While active, `tensor.type()` (no arguments) of a CPU tensor reports the CUDA type name
    of the same dtype ('torch.FloatTensor' -> 'torch.cuda.FloatTensor'). Nothing else changes."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if (
            func is torch.Tensor.type
            and len(args) == 1
            and not kwargs
            and isinstance(result, str)
            and result.startswith("torch.")
            and not result.startswith("torch.cuda.")
            and args[0].device.type == "cpu"
        ):
            return "torch.cuda." + result[len("torch.") :]
        return result


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaTypeNames():
            return fn(*args, **kwargs)

    return _mark(wrapper)


def _tensor_type_targets():
    """(owner, attribute, kind) of each upstream callable that checks `tensor.type()` strings."""
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    return (
        (distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups", "class"),
        (optimizer.Float16OptimizerWithFloat16Params, "__init__", "plain"),
        (clip_grads, "clip_grad_by_total_norm_fp32", "plain"),
        (optimizer, "clip_grad_by_total_norm_fp32", "plain"),
    )


def probe_tensor_type_checks() -> bool:
    """Gap present if gradient clipping rejects a CPU fp32 gradient (its `param.grad.type()`
    assertion), the same check `DistributedOptimizer` and the fp16/bf16 optimizer make."""
    from megatron.core.optimizer import optimizer

    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.zeros(2)
    return _raises(lambda: optimizer.clip_grad_by_total_norm_fp32([param], 1.0, 0.5))


def apply_tensor_type_checks() -> None:
    """megatron-core 0.16.1 identifies fp32/fp16/bf16 tensors by CUDA type strings:
    `optimizer/distrib_optimizer.py` (`DistributedOptimizer._build_model_and_main_param_groups`
    raises TypeError unless `param.type()` is 'torch.cuda.{Float,Half,BFloat16}Tensor'),
    `optimizer/optimizer.py` (`Float16OptimizerWithFloat16Params.__init__`, same check) and
    `optimizer/clip_grads.py` (`clip_grad_by_total_norm_fp32` asserts
    `param.grad.type() == 'torch.cuda.FloatTensor'`, also bound by name in `optimizer.py`). A CPU
    tensor reports 'torch.FloatTensor', so the distributed optimizer cannot be built and gradient
    clipping fails on CPU.

    Shim: those four bindings are wrapped to run under a `TorchFunctionMode` that, for the
    duration of the call only, makes zero-argument `tensor.type()` of a CPU tensor report the CUDA
    name of its dtype. The dtype dispatch is unchanged; no other call is affected.
    """
    for owner, attribute, kind in _tensor_type_targets():
        if isinstance(owner, type):
            current = owner.__dict__[attribute]
        else:
            current = getattr(owner, attribute)
        if kind == "class":
            if _is_marked(current.__func__):
                continue
            setattr(owner, attribute, classmethod(_with_cuda_type_names(current.__func__)))
        elif not _is_marked(current):
            setattr(owner, attribute, _with_cuda_type_names(current))


# --------------------------------------------------------------------------------------------
# 9. Uneven all-gather on gloo (found while bridging; not in the original list of gaps)
# --------------------------------------------------------------------------------------------


def _on_two_gloo_ranks(fn, timeout_s: float = 30.0) -> list:
    """Run `fn(rank, group)` on a 2-rank gloo group made of two threads of this process (no
    default process group needed). Returns each rank's result, or the exception it raised."""
    import datetime
    import threading

    import torch.distributed as dist

    store = dist.HashStore()
    results: list = [None, None]

    def rank_main(rank: int) -> None:
        try:
            options = dist.ProcessGroupGloo._Options()
            options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            options._timeout = datetime.timedelta(seconds=timeout_s)
            prefixed = dist.PrefixStore("cpu-shim-probe", store)
            group = dist.ProcessGroup(prefixed, rank, 2)
            group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
            group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO,
                                    dist.ProcessGroupGloo(prefixed, rank, 2, options))
            results[rank] = fn(rank, group)
        except Exception as error:  # noqa: BLE001 - reported to the caller
            results[rank] = error

    threads = [threading.Thread(target=rank_main, args=(rank,), daemon=True) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 5.0)
    return results


def _uneven_gather_on_rank(rank: int, group) -> torch.Tensor:
    from megatron.core.tensor_parallel import mappings

    rows = (2, 3)[rank]
    return mappings._gather_along_first_dim(torch.full((rows, 2), float(rank + 1)), group,
                                            output_split_sizes=[2, 3])


def probe_uneven_all_gather() -> bool:
    """Gap present if megatron's first-dim all-gather with unequal per-rank sizes fails (or
    gathers the wrong rows) on a real 2-rank gloo group."""
    expected = torch.cat([torch.full((2, 2), 1.0), torch.full((3, 2), 2.0)])
    # The upstream path also allocates on torch.cuda.current_device(): lend it gap 1's shim for
    # the probe so that this probe measures the collective alone, whatever is applied.
    saved_current_device = torch.cuda.current_device
    torch.cuda.current_device = _cpu_current_device
    try:
        results = _on_two_gloo_ranks(_uneven_gather_on_rank)
    finally:
        torch.cuda.current_device = saved_current_device
    return not all(isinstance(r, torch.Tensor) and torch.equal(r, expected) for r in results)


def apply_uneven_all_gather() -> None:
    """megatron-core 0.16.1 `tensor_parallel/mappings.py`: `_gather_along_first_dim(input_, group,
    output_split_sizes=...)` gathers a different number of rows from each rank with
    `torch.distributed.all_gather` into a list of unequal tensors. It backs
    `gather_from_sequence_parallel_region(..., output_split_sizes=...)` and the backward of
    `reduce_scatter_to_sequence_parallel_region(..., input_split_sizes=...)`, which
    `MoEAlltoAllTokenDispatcher` (`transformer/moe/token_dispatcher.py`) uses over the expert-TP
    group whenever expert TP > 1 and ranks route different token counts (EP x ETP layouts,
    padded tokens). Gloo's allgather only takes equal sizes: "ProcessGroupGloo::allgather:
    invalid tensor size". (The uneven reduce-scatter of the backward works on gloo.)

    Shim: the module attribute `mappings._gather_along_first_dim` is wrapped: with unequal
    `output_split_sizes`, each rank pads its rows to the largest split, upstream's equal-size
    path gathers the blocks, and the padding rows are dropped. Anything else goes to upstream.
    """
    from megatron.core.tensor_parallel import mappings

    upstream = mappings._gather_along_first_dim
    if _is_marked(upstream):
        return

    @functools.wraps(upstream)
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return upstream(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(size) for size in output_split_sizes]
        if len(set(sizes)) == 1:
            return upstream(input_, group, output_split_sizes, use_global_buffer)
        block = max(sizes)
        padded = input_.new_zeros((block, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        blocks = upstream(padded, group).split(block, dim=0)
        return torch.cat([rows[:size] for rows, size in zip(blocks, sizes)], dim=0)

    mappings._gather_along_first_dim = _mark(_gather_along_first_dim)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """One upstream gap: `probe()` is True while the gap is present; `apply()` bridges it."""

    name: str
    probe: Callable[[], bool]
    apply: Callable[[], None]

    @property
    def doc(self) -> str:
        return self.apply.__doc__ or ""


PATCHES: Tuple[Patch, ...] = (
    Patch("current_device", probe_current_device, apply_current_device),
    Patch("streams", probe_streams, apply_streams),
    Patch("rng_tracker", probe_rng_tracker, apply_rng_tracker),
    Patch("norm_sequence_parallel", probe_norm_sequence_parallel, apply_norm_sequence_parallel),
    Patch("router_te_general_gemm", probe_router_te_general_gemm, apply_router_te_general_gemm),
    Patch("alltoall_split_sizes", probe_alltoall_split_sizes, apply_alltoall_split_sizes),
    Patch("cuda_literals", probe_cuda_literals, apply_cuda_literals),
    Patch("tensor_type_checks", probe_tensor_type_checks, apply_tensor_type_checks),
    Patch("uneven_all_gather", probe_uneven_all_gather, apply_uneven_all_gather),
)


def apply_all() -> None:
    """Apply every patch in `PATCHES` (each is idempotent)."""
    for patch in PATCHES:
        patch.apply()
