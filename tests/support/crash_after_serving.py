"""A unit that serves HTTP, passes its first check, then exits 1 a moment later: what a model
server does when its first real batch runs out of memory (the bake window's case).

Run: python crash_after_serving.py PORT [SECONDS_AFTER_FIRST_REQUEST]
"""

from __future__ import annotations

import http.server
import os
import sys
import threading
import time


def main() -> None:
    port = int(sys.argv[1])
    after = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    armed = threading.Event()

    def crash() -> None:
        time.sleep(after)
        print(f"crashing {after}s after the first request", flush=True)
        os._exit(1)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok\n")
            if not armed.is_set():
                armed.set()
                threading.Thread(target=crash, daemon=True).start()

        def log_message(self, format: str, *args: object) -> None:
            pass

    print(f"serving on {port}", flush=True)
    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
