"""Decode the routed experts SGLang returns with a generation (`--enable-return-routed-experts`).

The server sends `meta_info["routed_experts"]`: base64 of little-endian int32, shaped
[prompt_len + completion_len - 1, num_moe_layers, top_k] (one row per token that was fed through the
model: every token but the last generated one).
"""

from __future__ import annotations

import base64

import numpy as np


class RoutedExpertsError(ValueError):
    """The payload does not have the expected number of values."""


def decode_routed_experts(payload: str, num_tokens: int, num_layers: int) -> np.ndarray:
    """base64 int32 payload -> int32 array [num_tokens, num_layers, top_k]."""
    flat = np.frombuffer(base64.b64decode(payload), dtype="<i4")
    per_token = num_tokens * num_layers
    if per_token == 0 or flat.size % per_token:
        raise RoutedExpertsError(f"routed_experts has {flat.size} values, not a multiple of "
                                 f"num_tokens*num_layers = {num_tokens}*{num_layers}")
    return flat.reshape(num_tokens, num_layers, flat.size // per_token).astype(np.int32)
