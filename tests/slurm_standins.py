"""Stand-ins for `megatron-vespo serve` and the trainer inside a real Slurm job (tests/test_slurm.py).

`serve --out DIR --port P [--router-port R --worker-urls U,U]` answers GET /health on P (and on R,
as the "router") with who it is, until SIGTERM, when it records that it was stopped.
`learn DIR KEY=VALUE...` runs under torchrun: every rank writes DIR/rank{RANK}.json with what
torchrun told it; rank 0 also reads the fleet's addresses from the overrides and fetches every
/health through them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _health_server(host: str, port: int, identity: dict) -> ThreadingHTTPServer:
    body = json.dumps(identity).encode()

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep the step's log to what the test needs
            pass

    server = ThreadingHTTPServer((host, port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve(args: argparse.Namespace) -> None:
    node = os.environ.get("SLURMD_NODENAME", "?")
    identity = {"role": "server", "node": node, "host": args.host, "port": args.port}
    _health_server(args.host, args.port, identity)
    if args.router_port:
        _health_server(args.host, args.router_port, {"role": "router", "node": node,
                                                      "port": args.router_port,
                                                      "worker_urls": args.worker_urls.split(",")})
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()
    (Path(args.out) / f"stopped-{node}-{args.port}").write_text("SIGTERM\n")


def learn(args: argparse.Namespace) -> None:
    # torchrun has already met its peers at MASTER_ADDR:MASTER_PORT (the static rendezvous) before
    # it starts this rank, so RANK and GROUP_RANK show the rendezvous worked; torch is not needed.
    env = {k: os.environ.get(k) for k in ("RANK", "GROUP_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                          "MASTER_PORT", "SLURMD_NODENAME")}
    report = {"env": env}
    if env["RANK"] == "0":
        overrides = dict(item.split("=", 1) for item in args.overrides)
        router_url = overrides["rollout.fleet.attach_router_url"]
        worker_urls = overrides["rollout.fleet.attach_worker_urls"].strip("[]").split(",")

        def health(url):
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                return json.load(response)

        report.update(router_url=router_url, router=health(router_url), worker_urls=worker_urls,
                      workers=[health(url) for url in worker_urls])
    (Path(args.out) / f"rank{env['RANK']}.json").write_text(json.dumps(report, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(required=True)
    s = sub.add_parser("serve")
    s.add_argument("--out", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--host", required=True)
    s.add_argument("--router-port", type=int)
    s.add_argument("--worker-urls", default="")
    s.set_defaults(func=serve)
    t = sub.add_parser("learn")
    t.add_argument("out")
    t.add_argument("overrides", nargs="*")
    t.set_defaults(func=learn)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
