"""A bounded load generator for tests and benchmarks: N requests at fixed concurrency.

Traffic goes only to the given URL (loopback, or a fleet-lab address); the loop stops by itself
after N requests (with `until`: after N, once the event is set).
"""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


@dataclass
class LoadResult:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    served_by: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def _aborted(response: httpx.Response) -> bool:
    try:
        choices = response.json().get("choices") or []
    except ValueError:
        return False
    return any(c.get("finish_reason") == "abort" for c in choices if isinstance(c, dict))


async def run_load(
    url: str,
    model: str,
    total: int,
    concurrency: int = 32,
    until: threading.Event | None = None,
) -> LoadResult:
    """POST `total` one-token completions to `url` with `concurrency` in flight; with `until`,
    at least `total`, and on until the event is set (load that outlasts an operation)."""
    result = LoadResult()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    body = {"model": model, "prompt": "hello", "max_tokens": 2}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    if until is None or until.is_set():
                        return
                result.sent += 1
                try:
                    response = await client.post(f"{url}/v1/completions", json=body)
                except httpx.HTTPError as exc:
                    result.failed += 1
                    result.errors[type(exc).__name__] += 1
                    continue
                if response.status_code == 200 and _aborted(response):
                    # vLLM answers a request it aborted (a shutdown) with 200 and
                    # finish_reason "abort": a lost request, not a served one.
                    result.failed += 1
                    result.errors["finish_reason abort"] += 1
                elif response.status_code == 200:
                    result.ok += 1
                    result.served_by[response.json().get("model", "?")] += 1
                else:
                    result.failed += 1
                    result.errors[f"HTTP {response.status_code}"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.monotonic() - start
    return result


class BackgroundLoad:
    """run_load in a thread, so a deploy can run in the foreground meanwhile."""

    def __init__(
        self,
        url: str,
        model: str,
        total: int,
        concurrency: int = 32,
        until: threading.Event | None = None,
    ) -> None:
        self.result: LoadResult | None = None
        self._thread = threading.Thread(
            target=lambda: setattr(
                self, "result", asyncio.run(run_load(url, model, total, concurrency, until))
            ),
            daemon=True,
        )

    def start(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def join(self, timeout: float = 600) -> LoadResult:
        self._thread.join(timeout)
        assert self.result is not None, "the load generator did not finish"
        return self.result


@dataclass(frozen=True)
class Answer:
    """One request of a ContinuousLoad: when it started, how long it took, what came back."""

    at: float  # time.monotonic() when it was sent
    seconds: float
    status: int  # 0: no HTTP answer (connection error, timeout)
    aborted: bool = False


class ContinuousLoad:
    """One-token completions to `url` from `concurrency` workers until stopped; every answer
    kept with its start time and latency (a request that hangs shows as a long one)."""

    def __init__(self, url: str, model: str, concurrency: int = 4, timeout: float = 30.0) -> None:
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._url, self._model = url, model
        self._concurrency, self._timeout = concurrency, timeout
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        body = {"model": self._model, "prompt": "hello", "max_tokens": 2}
        async with httpx.AsyncClient(timeout=self._timeout) as client:

            async def worker() -> None:
                while not self._stop.is_set():
                    start = time.monotonic()
                    try:
                        response = await client.post(f"{self._url}/v1/completions", json=body)
                    except httpx.HTTPError:
                        self.answers.append(Answer(start, time.monotonic() - start, 0))
                        continue
                    took = time.monotonic() - start
                    aborted = response.status_code == 200 and _aborted(response)
                    self.answers.append(Answer(start, took, response.status_code, aborted))

            await asyncio.gather(*(worker() for _ in range(self._concurrency)))

    def start(self) -> ContinuousLoad:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> list[Answer]:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load generator did not stop"
        return list(self.answers)

    def between(self, start: float, end: float) -> list[Answer]:
        """The answers to requests sent within [start, end)."""
        return [a for a in list(self.answers) if start <= a.at < end]


def served(address: str, port: int) -> float:
    """Completions the simulator (or vLLM) at address:port answered: the sum of its
    vllm:request_success_total over every finish reason."""
    conn = http.client.HTTPConnection(address, port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )
