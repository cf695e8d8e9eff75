"""hxp.io.scrape: the raw asyncio GET (and the httpx one) against in-process servers: a page,
a chunked page, a dead port, a server that never answers, an error status."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest

from hxp.io.scrape import Fetched, FetchError, fetch_all, parse_response, scrape
from hxp.metrics import parse_page, wanted_families

PAGE = (Path(__file__).parents[1] / "data" / "vllm_metrics" / "v0.33_chat-0_t1.txt").read_text()


def test_parse_response_content_length_and_chunked() -> None:
    assert parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello") == (200, b"hello")
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked = head + b"5\r\nhello\r\n3;x=1\r\n!!!\r\n0\r\n\r\n"
    assert parse_response(chunked) == (200, b"hello!!!")
    assert parse_response(b"HTTP/1.0 404 Not Found\r\n\r\n") == (404, b"")


@pytest.mark.parametrize(
    ("raw", "words", "cls"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "cut short", "transient"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP answer", "permanent"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\nxx", "compressed", "permanent"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "no complete HTTP header", "transient"),
    ],
)
def test_parse_response_rejects(raw: bytes, words: str, cls: str) -> None:
    with pytest.raises(FetchError, match=words) as caught:
        parse_response(raw)
    assert caught.value.error_class == cls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve(body: bytes, status: str = "200 OK", chunked: bool = False,
                hang: bool = False) -> tuple[asyncio.Server, str]:  # fmt: skip
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if hang:
            await asyncio.sleep(30)
        if chunked:
            payload = b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + 4000]), body[i : i + 4000])
                for i in range(0, len(body), 4000)
            )
            head = f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            writer.write(head + payload + b"0\r\n\r\n")
        else:
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            writer.write(body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/metrics"


@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_fetch_all_pages_dead_ports_timeouts_and_errors(client: str) -> None:
    async def main() -> dict[str, Fetched]:
        ok, ok_url = await serve(PAGE.encode())
        chunks, chunked_url = await serve(PAGE.encode(), chunked=True)
        slow, slow_url = await serve(b"", hang=True)
        broken, broken_url = await serve(b"oops", status="500 Internal Server Error")
        missing, missing_url = await serve(b"no", status="404 Not Found")
        dead_url = f"http://127.0.0.1:{free_port()}/metrics"
        seen: list[str] = []
        try:
            return await fetch_all(
                [ok_url, chunked_url, slow_url, broken_url, missing_url, dead_url],
                timeout=0.5,
                concurrency=3,
                on_page=lambda f: seen.append(f.url),
                client=client,  # type: ignore[arg-type]
            )
        finally:
            for server in (ok, chunks, slow, broken, missing):
                server.close()
            assert len(seen) == 6

    started = time.monotonic()
    results = asyncio.run(main())
    assert time.monotonic() - started < 3
    by_kind = {url.rsplit(":", 1)[1]: r for url, r in results.items()}
    bodies = [r for r in results.values() if r.body is not None]
    assert len(bodies) == 2
    assert all(r.body == PAGE for r in bodies)
    errors = sorted((r.error, r.error_class) for r in results.values() if r.body is None)
    assert ("HTTP 404", "permanent") in errors
    assert ("HTTP 500", "transient") in errors
    assert ("timed out", "transient") in errors
    assert any(cls == "transient" and ("refused" in e or "Connect" in e) for e, cls in errors)
    assert by_kind


def test_scrape_parses_each_page_and_reports_the_rest() -> None:
    from hxp.metrics import Target

    async def start() -> tuple[asyncio.Server, str, asyncio.Server, str]:
        good, good_url = await serve(PAGE.encode())
        html, html_url = await serve(b"<html><body>login</body></html>\n")
        return good, good_url, html, html_url

    loop = asyncio.new_event_loop()
    _good, good_url, _html, html_url = loop.run_until_complete(start())

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        dead = f"http://127.0.0.1:{free_port()}/metrics"
        targets = [Target("a", "m", good_url, "0.33.0"), Target("b", "m", html_url, "0.33.0"),
                   Target("c", "m", dead, "0.33.0")]  # fmt: skip
        out = scrape(targets, wanted_families(), timeout=2, concurrency=8)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    assert out["a"].page is not None
    assert out["a"].page.counters == parse_page(PAGE, wanted_families()).counters
    assert out["b"].page is None
    assert "not a metrics page" in out["b"].error
    assert out["b"].error_class == "permanent"
    assert out["c"].page is None
    assert out["c"].error_class == "transient"
