import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device; on CPU they are skipped, and the CPU path of the same
    logic is covered by the unmarked tests. Those that also need TransformerEngine skip
    themselves, saying so (`needs_transformer_engine`)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def needs_transformer_engine() -> None:
    """Skip the calling test, with the reason, where TransformerEngine is not installed."""
    if importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("needs transformer_engine (the TE spec and THD attention)")
