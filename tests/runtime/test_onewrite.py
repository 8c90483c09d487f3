"""The serving protocol's writes (onewrite.py) and its keep-alive clock (headlimits.py).

The writes are the protocol's contract with its transport, so these tests run the
protocol on a transport that records them (a socket cannot show where one write ended:
TCP may join or split segments). Everything a client sees end to end is tested over
real sockets in test_http.py, test_limits.py and the rest.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from mlbuild.runtime import onewrite
from mlbuild.runtime.headlimits import protocol_class


class RecordingTransport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def set_protocol(self, protocol) -> None:
        pass


async def _connect(app, keepalive: float = 5.0):
    config = Config(app=app, http=protocol_class(10.0, 32 * 1024), lifespan="off",
                    ws="none", log_level="warning", timeout_keep_alive=keepalive)
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(),
                                          app_state={}, _loop=asyncio.get_running_loop())
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def _settle(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def _request(method: str = "GET", path: str = "/") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def _fixed(body: bytes):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
    return app


def test_an_answer_of_known_length_is_one_write():
    async def main():
        protocol, transport = await _connect(_fixed(b"hello"))
        protocol.data_received(_request())
        await _settle()
        (answer,) = transport.writes
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b"\r\n\r\nhello")
        assert b"content-length: 5\r\n" in answer
        assert not transport.closed
    asyncio.run(main())


def test_pipelined_answers_are_written_in_order_one_write_each():
    async def main():
        protocol, transport = await _connect(_fixed(b"ok"))
        protocol.data_received(_request(path="/a") + _request(path="/b"))
        await _settle(40)
        assert len(transport.writes) == 2
        assert all(w.endswith(b"\r\n\r\nok") for w in transport.writes)
    asyncio.run(main())


def test_a_large_body_follows_its_head_in_a_write_of_its_own():
    body = b"x" * (onewrite.JOIN_LIMIT + 1)

    async def main():
        protocol, transport = await _connect(_fixed(body))
        protocol.data_received(_request())
        await _settle()
        head, rest = transport.writes
        assert head.endswith(b"\r\n\r\n") and rest == body
    asyncio.run(main())


def test_a_stream_sends_its_head_before_its_first_chunk():
    go = None

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await go.wait()
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def main():
        nonlocal go
        go = asyncio.Event()
        protocol, transport = await _connect(app)
        protocol.data_received(_request())
        await _settle()
        (head,) = transport.writes  # written while the stream waits for its first chunk
        assert head.endswith(b"transfer-encoding: chunked\r\n\r\n")
        go.set()
        await _settle()
        assert transport.writes[1:] == [b"3\r\none\r\n", b"0\r\n\r\n"]
    asyncio.run(main())


@pytest.mark.parametrize("method,status,length", [("HEAD", 200, b"5"), ("GET", 204, b"0")])
def test_an_answer_without_a_body_is_written_at_once(method, status, length):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", length)]})
        await send({"type": "http.response.body", "body": b""})

    async def main():
        protocol, transport = await _connect(app)
        protocol.data_received(_request(method) + _request(method))  # the second one too
        await _settle(40)
        writes = [w for w in transport.writes if w]  # (uvicorn writes a 204's empty body)
        assert len(writes) == 2
        assert all(w.startswith(b"HTTP/1.1 %d " % status) and w.endswith(b"\r\n\r\n")
                   for w in writes)
    asyncio.run(main())


def test_an_answer_left_unfinished_writes_its_head_and_closes():
    async def app(scope, receive, send):  # uvicorn logs and closes the connection
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"10")]})

    async def main():
        protocol, transport = await _connect(app)
        protocol.data_received(_request())
        await _settle()
        (head,) = transport.writes
        assert head.endswith(b"content-length: 10\r\n\r\n") and transport.closed
    asyncio.run(main())


def test_a_bad_header_is_uvicorns_500_and_nothing_of_it_is_written():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2"), (b"x-bad", b"a\r\nb")]})

    async def main():
        protocol, transport = await _connect(app)
        protocol.data_received(_request())
        await _settle()
        assert transport.closed  # uvicorn closes a connection whose answer had begun
        assert not any(b"x-bad" in w for w in transport.writes)
    asyncio.run(main())


# -- keep-alive: one timer per connection, an idle one closes on time ------------------
def test_keepalive_counts_from_the_last_answer_not_the_first():
    async def main():
        protocol, transport = await _connect(_fixed(b"ok"), keepalive=0.4)
        protocol.data_received(_request())
        await _settle()
        await asyncio.sleep(0.25)
        protocol.data_received(_request())  # busy again before the first answer's timeout
        await _settle()
        last = time.monotonic()
        await asyncio.sleep(0.25)  # 0.5 s after the first answer, 0.25 after the last
        assert not transport.closed
        while not transport.closed and time.monotonic() - last < 5:
            await asyncio.sleep(0.02)
        assert transport.closed
        assert time.monotonic() - last >= 0.35
    asyncio.run(main())


def test_a_request_in_progress_is_not_closed_by_the_keepalive_timer():
    release = None

    async def app(scope, receive, send):
        if scope["path"] == "/slow":
            await release.wait()
        await _fixed(b"ok")(scope, receive, send)

    async def main():
        nonlocal release
        release = asyncio.Event()
        protocol, transport = await _connect(app, keepalive=0.2)
        protocol.data_received(_request())
        await _settle()
        protocol.data_received(_request(path="/slow"))
        await asyncio.sleep(0.5)  # the timer armed by the first answer fires meanwhile
        assert not transport.closed
        release.set()
        await _settle()
        assert transport.writes[-1].endswith(b"\r\n\r\nok") and not transport.closed
        await asyncio.sleep(0.6)
        assert transport.closed
    asyncio.run(main())
