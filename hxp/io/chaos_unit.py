"""`python -m hxp.io.chaos_unit --port P --fault F`: the unit program of fault campaigns
(hxp.chaos). An HTTP server answering 200 on every path of 127.0.0.1:P, or one of the faults a
new revision can bring: exit at once, crash before listening, crash after serving, never listen,
listen late. `--stop-delay S`: on SIGTERM it exits only S seconds later (a slow stop)."""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import sys
import threading
import time


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hxp.io.chaos_unit")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--fault",
        default="none",
        choices=["none", "slow", "immediate-exit", "crash-before", "crash-after", "never-ready"],
    )
    parser.add_argument("--delay", type=float, default=1.0, help="seconds, for slow and crashes")
    parser.add_argument("--stop-delay", type=float, default=0.0, help="SIGTERM to exit, s")
    args = parser.parse_args(argv)
    if args.stop_delay > 0:
        later = args.stop_delay
        signal.signal(
            signal.SIGTERM, lambda *_: threading.Timer(later, lambda: os._exit(0)).start()
        )
    print(f"chaos unit: port {args.port}, fault {args.fault}", flush=True)
    if args.fault == "immediate-exit":
        return 3
    if args.fault == "crash-before":
        time.sleep(args.delay)
        return 4
    if args.fault == "never-ready":
        while True:
            time.sleep(3600)
    if args.fault == "slow":
        time.sleep(args.delay)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), _Quiet)
    if args.fault == "crash-after":
        threading.Timer(args.delay, lambda: os._exit(5)).start()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
