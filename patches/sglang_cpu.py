"""SGLang 0.5.23 on a CPU-only machine: import stubs and one allocator override.

sglang imports two packages at module level that have no CPU build on PyPI: `sgl_kernel` (CUDA
kernels) and `torchvision` (the PyPI wheel needs CUDA libraries). Neither is called on the CPU path
of a text model (torch-native attention and sampling), so a placeholder module is enough: any name
looked up in it is a placeholder class that raises when used, which makes an unexpected call fail
loudly instead of silently. Real installs always win: a stub is only served when the package is
missing.

The routed-experts capture buffer (`--enable-return-routed-experts`) allocates host memory through
CUDA host registration; on CPU a plain tensor is the same thing.

`install()` must run in every process of the server; `megatron_vespo.rollout.sglang_main` does that
(sglang starts its scheduler and detokenizer with the `spawn` method, which re-imports the main module
in each child).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

UPSTREAM_VERSION = "0.5.23"
STUBBED_PACKAGES = ("sgl_kernel", "torchvision")


class _Placeholder(type):
    """A class standing in for any name of a stubbed package; attributes chain, calls raise."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{cls.__qualname__}.{name}", (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.__qualname__} comes from a CPU import stub (megatron_vespo.patches."
                           f"sglang_cpu) and cannot be used; this code path needs a GPU install")


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}", (), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves placeholder modules for the stubbed packages; sits last on sys.meta_path."""

    def __init__(self, packages):
        self.packages = frozenset(packages)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in self.packages:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+cpu-stub"
        return module

    def exec_module(self, module):
        pass


def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


def _plain_host_alloc(shape, dtype, device, pin_memory, allocator=None):
    del device, pin_memory, allocator  # host memory is plain memory without CUDA
    import torch

    return torch.empty(shape, dtype=dtype, device="cpu")


def install() -> list[str]:
    """Stub whichever of STUBBED_PACKAGES is not installed and override the CPU host allocator.
    Idempotent; returns the stubbed package names."""
    finder = next((f for f in sys.meta_path if isinstance(f, _StubFinder)), None)
    if finder is None:
        missing = [p for p in STUBBED_PACKAGES if _missing(p)]
        finder = _StubFinder(missing)
        sys.meta_path.append(finder)
    from sglang.srt.mem_cache.pool_host.common import ALLOC_MEMORY_FUNCS

    ALLOC_MEMORY_FUNCS["cpu"] = _plain_host_alloc
    return sorted(finder.packages)
