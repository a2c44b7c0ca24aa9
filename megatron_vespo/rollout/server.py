"""One SGLang server process started by this package, and the HTTP calls every server answers.

A server is `python -m megatron_vespo.rollout.sglang_main` (sglang's launch_server plus the CPU shim
when there is no GPU), token-in/token-out (`--skip-tokenizer-init`: the client sends input_ids and
reads output_ids, so tokenisation happens once, on the trainer's side). On CPU the flags select the
torch-native attention and sampling backends and fp32. The process gets its own session (process
group) so that stopping it also stops sglang's scheduler and detokenizer children.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import requests
import torch

from .auth import api_key_args, auth_headers
from .process import SessionProcess

CPU_KV_TOKENS = 65536
CPU_FLAGS = ("--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
             "--disable-cuda-graph")


class ServerError(RuntimeError):
    """A server did not start, died, or answered an HTTP call with an error."""


@dataclass(frozen=True)
class ServerOptions:
    """How each SGLang server of a fleet is started (the `rollout.server` config section)."""

    host: str = "127.0.0.1"  # bind address; 127.0.0.1 unless the fleet must be reached from elsewhere
    dtype: str = "auto"  # sglang --dtype; "auto" is float32 on CPU (log-probs comparable to fp32 training)
    tp: int = 1  # tensor-parallel GPUs per server
    mem_fraction_static: Optional[float] = None
    # KV-cache size in tokens. None: sglang sizes it from free memory on GPUs; on CPU that would
    # claim most of the machine's RAM per server, so CPU_KV_TOKENS is used instead.
    max_total_tokens: Optional[int] = None
    enable_routed_experts: bool = False  # MoE: return each token's routed experts (for R3 and metrics)
    startup_timeout_s: float = 600.0
    # sglang --random-seed (its sampler's generator); None: the fleet sets train.seed + server index
    random_seed: Optional[int] = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)  # passed to sglang verbatim

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s}")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ValueError(f"max_total_tokens must be >= 1, got {self.max_total_tokens}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")


def server_argv(model_path: str, port: int, opts: ServerOptions, cpu: Optional[bool] = None) -> list[str]:
    """The command line of one server (cpu: no CUDA device; None = detect)."""
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    dtype = "float32" if cpu and opts.dtype == "auto" else opts.dtype
    argv = [sys.executable, "-m", "megatron_vespo.rollout.sglang_main", "--model-path", str(model_path),
            "--host", opts.host, "--port", str(port), "--skip-tokenizer-init", "--dtype", dtype,
            "--tp-size", str(opts.tp)]
    if cpu:
        argv += CPU_FLAGS
    kv_tokens = opts.max_total_tokens or (CPU_KV_TOKENS if cpu else None)
    if kv_tokens is not None:
        argv += ["--max-total-tokens", str(kv_tokens)]
    if opts.mem_fraction_static is not None:
        argv += ["--mem-fraction-static", str(opts.mem_fraction_static)]
    if opts.enable_routed_experts:
        argv.append("--enable-return-routed-experts")
    if opts.random_seed is not None:
        argv += ["--random-seed", str(opts.random_seed)]
    return argv + api_key_args() + list(opts.extra_args)


def seeded(opts: ServerOptions, seed: int, index: int) -> ServerOptions:
    """`opts` with server `index` of a fleet seeded from the run's `seed`, unless the config
    already names a seed (then that seed + index): two runs with one seed sample alike."""
    base = seed if opts.random_seed is None else opts.random_seed
    return replace(opts, random_seed=base + index)


def get_json(url: str, path: str, timeout: float = 30.0) -> dict:
    """GET url+path and decode the JSON body; ServerError on failure."""
    try:
        r = requests.get(url + path, timeout=timeout, headers=auth_headers())
    except requests.RequestException as e:
        raise ServerError(f"GET {url}{path}: {e}") from None
    if r.status_code != 200:
        raise ServerError(f"GET {url}{path}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json()


def post_json(url: str, path: str, payload: Optional[dict] = None, timeout: float = 600.0) -> dict:
    """POST a JSON body to url+path; ServerError on a transport error, an HTTP error or a
    `{"success": false}` answer."""
    try:
        r = requests.post(url + path, json=payload or {}, timeout=timeout, headers=auth_headers())
    except requests.RequestException as e:
        raise ServerError(f"POST {url}{path}: {e}") from None
    if r.status_code != 200:
        raise ServerError(f"POST {url}{path}: HTTP {r.status_code}: {r.text[:500]}")
    body = r.json() if r.content else {}
    if isinstance(body, dict) and body.get("success") is False:
        raise ServerError(f"POST {url}{path}: {body.get('message', body)}")
    return body


def is_healthy(url: str, timeout: float = 5.0) -> bool:
    try:
        return requests.get(url + "/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def weight_version(url: str) -> str:
    """The weight version a server reports (`/model_info`)."""
    return str(get_json(url, "/model_info")["weight_version"])


class SGLangServer(SessionProcess):
    """An SGLang server subprocess: start, wait until healthy, stop (SIGTERM, then SIGKILL)."""

    def __init__(self, model_path: str, port: int, opts: ServerOptions, log_path: Path,
                 env: Optional[dict] = None):
        host = "127.0.0.1" if opts.host == "0.0.0.0" else opts.host
        super().__init__(server_argv(model_path, port, opts), f"http://{host}:{port}", log_path, env)
        self.opts = opts

    def wait_healthy(self, timeout: Optional[float] = None) -> None:
        """Block until /health answers 200; ServerError (with the log tail) if the process exits or
        the timeout passes."""
        self.wait_until(lambda: is_healthy(self.url, timeout=2.0), timeout or self.opts.startup_timeout_s,
                        "SGLang server", ServerError)
