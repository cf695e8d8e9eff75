"""A unit that serves HTTP, passes its first check, then exits 1 a moment later: what a model
server does when its first real batch runs out of memory (the bake window's case).

`CRASH_AFTER_SERVING` is a one-line Python program (no newline, `$` or `%`, so it passes as
one argument on every backend, systemd's ExecStart included):
`python3 -c CRASH_AFTER_SERVING PORT SECONDS` serves 200 on every GET and exits 1 `SECONDS`
after its first request.
"""

from __future__ import annotations

CRASH_AFTER_SERVING = (
    "import http.server as h, os, sys, threading as t, time; "
    "p, a = int(sys.argv[1]), float(sys.argv[2]); e = t.Event(); "
    "x = lambda: (time.sleep(a), print('crashing after serving', flush=True), os._exit(1)); "
    "g = lambda s: (s.send_response(200), s.end_headers(), s.wfile.write(b'ok'), "
    "e.is_set() or (e.set(), t.Thread(target=x, daemon=True).start())); "
    "H = type('H', (h.BaseHTTPRequestHandler,), {'do_GET': g, 'log_message': lambda s, *m: None}); "
    "v = h.ThreadingHTTPServer(('127.0.0.1', p), H); print('serving', flush=True); "
    "v.serve_forever()"
)


def crash_after_serving(python: str, port: int, seconds: float = 2.0) -> list[str]:
    """The argv of a unit that serves on `port`, then exits 1 `seconds` after its first
    request."""
    return [python, "-c", CRASH_AFTER_SERVING, str(port), str(seconds)]
