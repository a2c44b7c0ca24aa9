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


# Expert ids below 256 arrive as little-endian int32 whose three high bytes are zero. Three such
# values are 12 bytes, one 16-character block of base64, in which 10 characters encode only zero
# bits ("A") and the low bytes sit in the character pairs (0, 1), (5, 6) and (10, 11). A table per
# pair maps the pair, read as a little-endian uint16, to its byte, or to 256 where the characters
# are not base64 or carry a nonzero high bit (an id >= 256 or negative).
_BASE64 = np.full(256, -1, np.int32)
_BASE64[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
                      np.uint8)] = np.arange(64)
_FIRST, _SECOND = _BASE64[np.arange(65536) & 255], _BASE64[np.arange(65536) >> 8]
_VALID = (_FIRST >= 0) & (_SECOND >= 0)
_NOT_A_BYTE = 256
_PAIR_TABLES = tuple(  # (character offset in the block, table)
    (offset, np.where(_VALID & ok, byte, _NOT_A_BYTE).astype(np.uint16)) for offset, byte, ok in (
        (0, (_FIRST << 2) | (_SECOND >> 4), (_SECOND & 15) == 0),
        (5, ((_FIRST & 15) << 4) | (_SECOND >> 2), (_FIRST < 16) & ((_SECOND & 3) == 0)),
        (10, ((_FIRST & 3) << 6) | _SECOND, _FIRST < 4)))
# the zero characters of a block, as masks over its two little-endian uint64 words
_ZERO_MASKS = (np.uint64(0xFF0000FFFFFF0000), np.uint64(0xFFFFFFFF0000FFFF))
_ZERO_CHARS = (np.uint64(0x4100004141410000), np.uint64(0x4141414100004141))


def _low_bytes(payload: str, count: int) -> Optional[np.ndarray]:
    """The `count` int32 values of a base64 payload as uint8, when every one lies in [0, 256);
    None otherwise (the caller then decodes in full and names the bad id). It reads 6 of every
    16 characters through the pair tables instead of decoding all four bytes of every value."""
    blocks, tail = divmod(count, 3)
    raw = payload.encode("ascii", errors="replace")
    if len(raw) != 4 * -(-count * 4 // 3):
        return None
    words = np.ndarray((blocks, 2), "<u8", buffer=raw)
    for k in (0, 1):
        if not ((words[:, k] & _ZERO_MASKS[k]) == _ZERO_CHARS[k]).all():
            return None
    columns = np.empty((3, blocks), np.uint16)  # contiguous rows: np.take's fast path
    for k, (offset, table) in enumerate(_PAIR_TABLES if blocks else ()):
        index = np.ndarray((blocks,), "<u2", buffer=raw, offset=offset, strides=(16,))
        np.take(table, index, out=columns[k], mode="clip")  # uint16 indices are in range
    if blocks and columns.max() >= _NOT_A_BYTE:
        return None
    try:
        rest = np.frombuffer(binascii.a2b_base64(raw[blocks * 16:]), "<u4")
    except binascii.Error:
        return None
    if rest.size and rest.max() >= 256:
        return None
    flat = np.empty(count, np.uint8)
    flat[:blocks * 3].reshape(blocks, 3)[...] = columns.astype(np.uint8).T
    flat[blocks * 3:] = rest
    return flat


def decode_routed_experts(payload: str, num_tokens: int, num_layers: int,
                          num_experts: Optional[int] = None) -> np.ndarray:
    """base64 int32 payload -> compact array [num_tokens, num_layers, top_k] (`compact_routes`)."""
    per_token = num_tokens * num_layers
    if num_experts is not None and num_experts <= 256 and per_token:
        top_k = len(payload) * 3 // 4 // 4 // per_token  # padding aside, 4 bytes per id
        fast = _low_bytes(payload, per_token * top_k) if top_k else None
        if fast is not None:
            return compact_routes(fast.reshape(num_tokens, num_layers, top_k), num_experts)
    # binascii straight from the JSON string: base64.b64decode adds a validation copy (~25% slower)
    flat = np.frombuffer(binascii.a2b_base64(payload), dtype="<i4")
    per_token = num_tokens * num_layers
    if per_token == 0 or flat.size % per_token:
        raise RoutedExpertsError(f"routed_experts has {flat.size} values, not a multiple of "
                                 f"num_tokens*num_layers = {num_tokens}*{num_layers}")
    return compact_routes(flat.reshape(num_tokens, num_layers, flat.size // per_token), num_experts)
