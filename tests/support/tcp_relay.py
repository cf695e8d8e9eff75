"""A TCP relay: `python -m tests.support.tcp_relay LISTEN_ADDR TARGET_HOST:PORT` listens on
LISTEN_ADDR (port chosen by the OS), prints that port, and copies bytes both ways to the target.

The fleet lab uses it so that a Prefect worker inside a lab namespace reaches the test's Prefect
server, which listens on this machine's loopback only: the relay listens on the lab bridge's
address (198.18.0.1), inside the lab's own network.
"""

from __future__ import annotations

import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _serve(listen: str, host: str, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, listen, 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    listen, target = sys.argv[1], sys.argv[2]
    host, _, port = target.rpartition(":")
    asyncio.run(_serve(listen, host, int(port)))


if __name__ == "__main__":
    main()
