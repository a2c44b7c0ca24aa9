"""One SGLang server process started by this package, and the HTTP calls every server answers.

A server is `python -m megatron_vespo.rollout.sglang_main` (sglang's launch_server plus the CPU shim
when there is no GPU), token-in/token-out (`--skip-tokenizer-init`: the client sends input_ids and
reads output_ids, so tokenisation happens once, on the trainer's side). On CPU the flags select the
torch-native attention and sampling backends and fp32. The process gets its own session (process
group) so that stopping it also stops sglang's scheduler and detokenizer children.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import requests
import torch

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
    return argv + list(opts.extra_args)


def get_json(url: str, path: str, timeout: float = 30.0) -> dict:
    """GET url+path and decode the JSON body; ServerError on failure."""
    try:
        r = requests.get(url + path, timeout=timeout)
    except requests.RequestException as e:
        raise ServerError(f"GET {url}{path}: {e}") from None
    if r.status_code != 200:
        raise ServerError(f"GET {url}{path}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json()


def post_json(url: str, path: str, payload: Optional[dict] = None, timeout: float = 600.0) -> dict:
    """POST a JSON body to url+path; ServerError on a transport error, an HTTP error or a
    `{"success": false}` answer."""
    try:
        r = requests.post(url + path, json=payload or {}, timeout=timeout)
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


class SGLangServer:
    """An SGLang server subprocess: start, wait until healthy, stop (SIGTERM, then SIGKILL)."""

    def __init__(self, model_path: str, port: int, opts: ServerOptions, log_path: Path,
                 env: Optional[dict] = None):
        self.argv = server_argv(model_path, port, opts)
        self.url = f"http://{'127.0.0.1' if opts.host == '0.0.0.0' else opts.host}:{port}"
        self.opts = opts
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def wait_healthy(self, timeout: Optional[float] = None) -> None:
        """Block until /health answers 200; ServerError (with the log tail) if the process exits or
        the timeout passes."""
        deadline = time.monotonic() + (timeout or self.opts.startup_timeout_s)
        while time.monotonic() < deadline:
            if not self.alive:
                raise ServerError(f"SGLang server {self.url} exited with code {self.proc.returncode} "
                                  f"during start-up; log {self.log_path}:\n{self._log_tail()}")
            if is_healthy(self.url, timeout=2.0):
                return
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"SGLang server {self.url} not healthy after "
                          f"{timeout or self.opts.startup_timeout_s:.0f}s; log {self.log_path}:\n"
                          f"{self._log_tail()}")

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the server and its children at once (what a crash looks like to the fleet)."""
        self._signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the server's process group; SIGKILL whatever is left after grace_s."""
        if self.alive:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)  # sglang children may outlive their parent
        self.proc.wait()
