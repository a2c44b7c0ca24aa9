"""Do the servers hold what the learner sent? (`rollout.check_weight_update`)

After an update every server hashes each of its parameters (SGLang's `/weights_checker`, action
"checksum"); the learner's senders hash the same parameters as they stream them. SGLang loads the
HF tensors of one parameter back to back in checkpoint order (`state_adapter.engine_name`), so
the learner feeds each tensor's bytes, in stream order, into that parameter's running sha256 and
never holds a whole fused parameter. Any difference fails the update naming the server, the
parameter and the HF tensors it is made of.

SGLang's checksum on CPU is the first 8 bytes of the sha256 of the tensor's bytes (`tensor_hash`
in sglang 0.5.23, `tests/test_rollout_weights.py` checks that this module computes the same);
on GPU it hashes with a Triton kernel, and a server with tp_size > 1 hashes its slices, so the check
refuses both with a message naming the setting rather than reporting false differences.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Mapping, Sequence

import torch

from ..learner.hf_files import FlatBucket
from ..learner.model import ModelConfig
from ..learner.state_adapter import state_adapter
from .server import ServerError, get_json, post_json


class StreamChecksums:
    """Running checksums of the SGLang parameters a sender's buckets make up."""

    def __init__(self, cfg: ModelConfig) -> None:
        self._adapter = state_adapter(cfg)
        self._hashers: Dict[str, "hashlib._Hash"] = {}
        self.parts: Dict[str, List[str]] = {}  # SGLang parameter -> the HF tensors it is made of

    def add(self, bucket: FlatBucket) -> None:
        for hf_name, tensor in bucket.tensors:
            engine = self._adapter.engine_name(hf_name)
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._hashers.setdefault(engine, hashlib.sha256()).update(memoryview(data.numpy()))
            self.parts.setdefault(engine, []).append(hf_name)

    def digests(self) -> Dict[str, str]:
        """SGLang parameter -> its checksum as SGLang prints it (16 hex digits)."""
        return {name: h.digest()[:8].hex() for name, h in self._hashers.items()}


def refuse_unsupported(urls: Sequence[str]) -> None:
    """Raise naming the servers whose checksums this check cannot reproduce."""
    bad = {}
    for url in urls:
        info = get_json(url, "/server_info")
        if str(info.get("device", "cpu")) != "cpu" or int(info.get("tp_size", 1)) != 1:
            bad[url] = f"device={info.get('device')}, tp_size={info.get('tp_size')}"
    if bad:
        raise ServerError("rollout.check_weight_update compares whole-tensor CPU checksums and "
                          f"needs CPU servers with tp_size 1; these servers are not: {bad}")


def check_servers(urls: Sequence[str], expected: Mapping[str, str],
                  parts: Mapping[str, Sequence[str]], timeout: float = 600.0) -> None:
    """Raise `ServerError` naming every server and parameter whose checksum is not `expected`."""
    wrong = []
    for url in urls:
        ranks = post_json(url, "/weights_checker", {"action": "checksum"}, timeout)["ranks"]
        served = ranks[0]["checksums"]
        for name, digest in expected.items():
            if served.get(name) != digest:
                what = "absent" if name not in served else f"{served[name]}, learner {digest}"
                wrong.append(f"{url}: {name} ({what}; from {', '.join(parts[name][:4])}"
                             f"{', ...' if len(parts[name]) > 4 else ''})")
    if wrong:
        raise ServerError(f"after the weight update {len(wrong)} server parameters differ from the "
                          "learner's:\n  " + "\n  ".join(wrong[:20]))
