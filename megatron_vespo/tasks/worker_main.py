"""The loop every verifier worker script runs (worker_pool.py): imported as a sibling module by the
scripts, so a worker loads nothing of this package but this file.

`limit_memory` first (so a runaway expression fails with MemoryError instead of swapping), then the
worker's imports, then `serve(judge)`: {"ready": true} once, then one {"equal": judge(request)} line
per request line; any exception in judge answers false.
"""

import json
import sys
from typing import Callable


def limit_memory(max_bytes: int = 2 << 30) -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    except (ImportError, ValueError, OSError):  # not on this platform, or a lower hard limit
        pass


def serve(judge: Callable[[dict], bool]) -> None:
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            equal = bool(judge(json.loads(line)))
        except Exception:  # unparsable or unsupported: not shown equal
            equal = False
        sys.stdout.write(json.dumps({"equal": equal}) + "\n")
        sys.stdout.flush()
