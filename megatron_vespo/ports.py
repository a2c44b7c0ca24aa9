"""Free TCP ports for the processes this machine starts (rendezvous, servers, routers).

Ports come from PRODUCT_PORTS, below the kernel's ephemeral range (32768-60999 by default: bind(0)
and every outgoing connection take ports from there, so a port found free there can be taken by
another process's connection before our server binds it) and below SGLang's own band for its
NCCL ports (22000-29999, `sglang.srt.utils.network.get_free_port_below_ephemeral`).
"""

from __future__ import annotations

import random
import socket

PRODUCT_PORTS = range(10000, 22000)
SGLANG_PORTS = range(22000, 30000)
EPHEMERAL_LOW = 32768


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports of PRODUCT_PORTS free on `host` now (held open together so they differ)."""
    socks, ports = [], []
    try:
        for port in random.sample(PRODUCT_PORTS, len(PRODUCT_PORTS)):
            s = socket.socket()
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            ports.append(port)
            if len(ports) == n:
                return ports
        raise OSError(f"fewer than {n} free ports in {PRODUCT_PORTS.start}-{PRODUCT_PORTS.stop - 1}")
    finally:
        for s in socks:
            s.close()
