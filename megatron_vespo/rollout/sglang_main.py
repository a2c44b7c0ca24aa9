"""`python -m megatron_vespo.rollout.sglang_main <sglang server args>`: sglang's own launch_server,
with the CPU shim (`megatron_vespo.patches.sglang_cpu`) installed first when there is no GPU.

The shim is installed at import time, not under `__main__`, because sglang starts its scheduler and
detokenizer processes with `spawn`, which imports this module again (as `__mp_main__`) in each child.
"""

import os
import sys

import torch

from megatron_vespo.launch import dump_stacks_on_signal

dump_stacks_on_signal()  # in the scheduler and detokenizer too: each imports this module
if not torch.cuda.is_available():
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    from megatron_vespo.patches import sglang_cpu

    sglang_cpu.install()

if __name__ == "__main__":
    # sglang.launch_server's own main block; run from here so that this module stays `__main__`.
    from sglang.launch_server import load_plugins, prepare_server_args, run_server
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    try:
        run_server(prepare_server_args(sys.argv[1:]))
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
