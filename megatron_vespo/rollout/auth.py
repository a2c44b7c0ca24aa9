"""The fleet's API key. Every SGLang server and router this package starts requires it
(`--api-key`: all endpoints but /health, weight updates included), and every request this package
sends to a fleet carries it (`Authorization: Bearer`).

One key per run: MEGATRON_VESPO_API_KEY when set (a fleet someone else runs with that key), else
`RUN_DIR/.api_key`, made on first use, readable by its owner only. The learners and every Slurm
serve task of a job read that one file on the shared file system; whoever comes first writes it,
atomically, so nobody reads half a key.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Optional

ENV = "MEGATRON_VESPO_API_KEY"
KEY_FILE = ".api_key"

_key: Optional[str] = None  # this process's fleet key (one run per process)


def run_api_key(run_dir: Path) -> str:
    """The run's key: the environment's, else the run directory's (created if missing)."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    path = Path(run_dir) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{KEY_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        try:
            os.link(tmp, path)  # fails if another process wrote it first: theirs stands
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def use_api_key(key: Optional[str]) -> None:
    """Start the fleet's servers and router with `key`, and send it with every request."""
    global _key
    _key = key


def api_key() -> Optional[str]:
    """This process's fleet key (None without one)."""
    return _key


def api_key_args() -> list[str]:
    """The `--api-key` flag of the servers and router this process starts ([] without a key)."""
    return ["--api-key", _key] if _key else []


def auth_headers() -> dict[str, str]:
    """The headers every request to the fleet carries."""
    return {"Authorization": f"Bearer {_key}"} if _key else {}
