"""Serves a folder over HTTP on the loopback until stopped: `python -m tests.serve_shards DIR [--throttle B]`.

The test suite's FaultyHTTPServer (tests/servers.py) as a process of its own, for measuring
`vae-dist bench data|e2e --shards URL` against a link we control (launch/bench_remote.sh): it
prints its URL as its first line, then serves until SIGTERM/SIGINT. `--throttle B`: each
transfer is sent at B bytes/s (per connection: a loader fetching N shards at once gets up to N x B).
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from .servers import FaultyHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder to serve")
    parser.add_argument("--throttle", type=float, default=None, metavar="BYTES_PER_S",
                        help="send each transfer at this rate (default: as fast as it goes)")
    args = parser.parse_args()
    if not args.root.is_dir():
        parser.error(f"not a folder: {args.root}")
    server = FaultyHTTPServer(args.root)
    if args.throttle:
        server.throttle(int(args.throttle))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(server.url, flush=True)
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
