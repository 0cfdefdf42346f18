"""The reliability tests' client (tests/reliability.py) on a local socket server: a request's
own deadline, not the client's default timeout, decides when it has hung (CI's failed run of
`test_redeploy`: a request queued behind a starting engine for longer than the client's
180-s read timeout escaped as `httpx.ReadTimeout` instead of waiting out its 270-s deadline)."""

from __future__ import annotations

import asyncio
import json

import pytest
from reliability import new_client, request


async def _slow_server(delay_s: float) -> tuple[asyncio.base_events.Server, str]:
    """An HTTP server that answers every request with a chat completion after `delay_s`."""
    body = json.dumps({"choices": [{"message": {"content": "x"}}], "usage": {"completion_tokens": 1}}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
        )
        await reader.readexactly(length)
        await asyncio.sleep(delay_s)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(("deadline_s", "result"), [(5.0, "ok"), (0.5, "hang")])
def test_the_request_deadline_not_the_client_timeout_decides_a_hang(deadline_s, result):
    async def run():
        server, url = await _slow_server(1.0)
        async with server, new_client(timeout_s=0.2) as client:  # the client's own timeout: shorter
            return await request(client, url, {"stream": False}, deadline_s=deadline_s)

    out = asyncio.run(run())
    assert out.result == result, out
    if result == "hang":
        assert out.detail == f"no end within {deadline_s:.0f} s" and out.latency < 1.0, out
    else:
        assert out.status == 200 and out.latency >= 1.0, out
