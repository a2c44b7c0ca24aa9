import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA and TransformerEngine; on CPU they are skipped, and the CPU path
    of the same logic is covered by the unmarked tests."""
    if torch.cuda.is_available() and importlib.util.find_spec("transformer_engine"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and transformer_engine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
