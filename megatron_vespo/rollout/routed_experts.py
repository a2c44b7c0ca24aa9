"""Decode the routed experts SGLang returns with a generation (`--enable-return-routed-experts`).

The server sends `meta_info["routed_experts"]`: base64 of little-endian int32, shaped
[prompt_len + completion_len - 1, num_moe_layers, top_k] (one row per token that was fed through the
model: every token but the last generated one), decoded straight into the sample's compact layout
(`learner.samples.compact_routes`).
"""

from __future__ import annotations

import binascii
from typing import Optional

import numpy as np

from ..learner.samples import compact_routes


class RoutedExpertsError(ValueError):
    """The payload does not have the expected number of values."""


def decode_routed_experts(payload: str, num_tokens: int, num_layers: int,
                          num_experts: Optional[int] = None) -> np.ndarray:
    """base64 int32 payload -> compact array [num_tokens, num_layers, top_k] (`compact_routes`)."""
    # binascii straight from the JSON string: base64.b64decode adds a validation copy (~25% slower)
    flat = np.frombuffer(binascii.a2b_base64(payload), dtype="<i4")
    per_token = num_tokens * num_layers
    if per_token == 0 or flat.size % per_token:
        raise RoutedExpertsError(f"routed_experts has {flat.size} values, not a multiple of "
                                 f"num_tokens*num_layers = {num_tokens}*{num_layers}")
    return compact_routes(flat.reshape(num_tokens, num_layers, flat.size // per_token), num_experts)
