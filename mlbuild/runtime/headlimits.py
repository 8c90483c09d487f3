"""Limits on a request's head (request line and headers), in time and in size.

uvicorn's httptools protocol has neither: a client that sends half a head and then
nothing holds its connection (and a file descriptor) for ever, and httptools keeps an
unfinished header value in memory however long it grows. :func:`protocol_class` makes a
subclass of that protocol which

- closes a connection whose head is not complete ``header_timeout`` seconds after the
  connection was opened, or after the first byte of a request that follows a keep-alive
  one. The deadline is a total, so a head dribbled a byte at a time is cut too. A client
  that had sent part of a head gets 408 first (as Node's ``headersTimeout`` answers); one
  that sent nothing is just closed, as an idle keep-alive connection is (uvicorn's
  ``timeout_keep_alive`` bounds those). While an earlier request on the connection is
  still being answered (the client sent the next one early), the clock waits: the
  server's slowness is not the client's;
- counts the bytes of a head as they arrive and, past ``max_header_bytes``, answers 414
  when the request line alone fills the limit (as nginx and Apache do) or 431 when the
  headers do, without feeding the parser another byte: no connection holds more than the
  limit. (One exception: a client that pipelines may add the rest of the read in which
  its previous request ended, at most one socket read.) More than MAX_HEADER_COUNT
  headers get 431 too, as gunicorn's and Apache's default limit.

The body is bounded the same way, one phase later (Apache's mod_reqtimeout, whose
defaults these follow): once the head is in, the body gets ``header_timeout`` more
seconds, plus one second for every MIN_BODY_RATE bytes that arrived; a body that
falls behind is answered 408 (or, when the app has answered already, the connection just
closes). A byte now and then does not hold a connection for ever, and a large upload at
any real speed is never cut. The clock waits while the server does not read (a request
queued behind an earlier one, or a body the app has not asked for yet).

Refusals carry ``Connection: close`` and follow the answers to earlier requests on the
connection. The connection then only reads and drops what the client still sends, for
at most LINGER seconds (nginx's lingering close): closing a socket with unread data
resets the connection, and the client would see the reset instead of the answer. A
request the parser rejects (uvicorn answered it at once, ahead of the answers still
owed to earlier pipelined requests, which were lost) is refused the same way. When a
request's body is what fails (too slow, or broken chunked framing), its app sees the
client leave and counts the request as the status the client got (scope key
``mlbuild.refused``), not as a client that went away.

Upgrade requests (websocket, h2c) are answered as plain HTTP: uvicorn runs with
``ws="none"`` (server.py); the connection closes after the answer, since the parser
reads nothing after an upgrade request.

Cost on the hot path: a ``loop.time()`` and a few attribute checks per request, and two
overridden parser callbacks (~0.7 us of CPU a request, measured on the protocol alone
with a no-op app; a small predict costs ~250 us); the body's deadline adds an addition
and two stores. The deadline timer is armed when a connection opens and re-armed only
when it fires with a request in progress: not once per request. The idle keep-alive
timeout works the same way (one timer a connection, where uvicorn makes one a request),
and answers go out in one write each (onewrite.py).
"""

from __future__ import annotations

import asyncio
import http
import logging

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mlbuild.runtime import onewrite
from mlbuild.runtime.app import REFUSED_KEY, _error

log = logging.getLogger("azmlinfsrv")

MAX_HEADER_COUNT = 100
LINGER = 2.0  # seconds a refused connection drains before it closes
# Bytes a second a body must average once its grace time (header_timeout) is over:
# mod_reqtimeout's default MinRate is 500. A 10 MB body may take 10000 s at that rate.
MIN_BODY_RATE = 1024
LATE = 1.0  # seconds a deadline timer may fire late before the loop counts as held
# Bytes of a head that belong to neither the URL nor a header: the method, a space, a
# leading empty line. A head whose URL takes all but these is a too-long request line.
_REQUEST_LINE_SLACK = 32


# uvicorn's callbacks, called without super(): these run for every request.
_on_headers_complete = onewrite.on_headers_complete
_on_message_complete = HttpToolsProtocol.on_message_complete


class _Refused(Exception):
    """Raised in a parser callback to stop the parser; data_received answers."""


class HeadLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size limit on each request head.

    Attributes:
        header_timeout: Seconds a head may take (see the module docstring).
        max_header_bytes: Largest head (request line and headers) accepted, in bytes.
    """

    header_timeout: float = 10.0
    max_header_bytes: int = 32 * 1024

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # NOTE: a head is "in progress" from the end of the previous message (or the
        # connection's start) to on_headers_complete; the deadline starts only with its
        # first byte, so an idle keep-alive period does not count against it. (A head
        # begun in the read that ended the previous request starts it with its next
        # read; until then uvicorn's keep-alive timer bounds the connection.)
        self._in_head = True
        self._head_used = 0  # bytes of the current head received so far
        # Loop time; None: no request in progress. A head's deadline, then (from
        # on_headers_complete to on_message_complete) the base of its body's.
        self._head_deadline: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal = 0  # the status a _Refused raised in a callback stands for
        self._refusing = False  # a refusal waits for an earlier request's answer
        self._body_bytes = 0  # bytes read since the current head was complete
        self._previous_cycle = None  # the request before the current one (pipelining)
        # Keep-alive: loop time the last answer completed, None while a request is in
        # (see on_response_complete).
        self._idle_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- the deadline -------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # What this protocol and its request cycles write through (onewrite.py); uvicorn's
        # flow control keeps the transport itself.
        self.transport = onewrite.HeadHolder(transport)
        self._head_deadline = self.loop.time() + self.header_timeout
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timer_fired)

    def connection_lost(self, exc) -> None:
        self._stop_clock()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        super().connection_lost(exc)

    # -- keep-alive ----------------------------------------------------------------------
    # NOTE: uvicorn arms a keep-alive timer as each answer completes and cancels it when
    # the next request's bytes arrive: a timer made and dropped per request (~2 us of a
    # ~200 us predict). Here a connection has one timer, re-armed only when it fires:
    # an idle connection still closes timeout_keep_alive seconds after its last answer.
    def on_response_complete(self) -> None:
        """uvicorn's, with the keep-alive clock above."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:  # requests the client sent early: the next one starts
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.timeout_keep_alive,
                                                    self._idle_timer_fired)

    def _idle_timer_fired(self) -> None:
        self._idle_timer = None
        since = self._idle_since
        if since is None or self.transport.is_closing():
            return  # a request is in: its answer arms the timer again
        left = since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self._idle_timer = self.loop.call_later(left, self._idle_timer_fired)
        else:
            self.timeout_keep_alive_handler()

    def _unset_keepalive_if_required(self) -> None:  # uvicorn calls it as bytes arrive
        self._idle_since = None

    def _start_clock(self) -> None:
        self._head_deadline = self.loop.time() + self.header_timeout
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout,
                                                    self._head_timer_fired)

    def _stop_clock(self) -> None:
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timer_fired(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None or self.transport.is_closing():
            return  # no request in progress: the next one arms the timer again
        now = self.loop.time()
        if not self._in_head:
            deadline = self._body_deadline(now)
        elif self.cycle is not None and not self.cycle.response_complete:
            # An earlier request is still being answered; the client sent the next one
            # early. Its time starts again (the answer may take minutes).
            deadline = self._head_deadline = now + self.header_timeout
        if deadline > now:
            self._head_timer = self.loop.call_later(deadline - now, self._head_timer_fired)
            return
        if now - deadline > LATE:
            # NOTE: the event loop was held past the deadline (an inline run() that took
            # long): what the client sent meanwhile waits unread in the socket, and timers
            # run before reads. Read it first, then judge.
            self._head_deadline += now - deadline
            self._head_timer = self.loop.call_later(0.05, self._head_timer_fired)
            return
        if not self._in_head:
            log.info("%s: request body late (%gs, then %d bytes/s): 408", self._peer(),
                     self.header_timeout, MIN_BODY_RATE)
            self._abandon_request(408, f"request body not received in time ({self.header_timeout:g}"
                                       f" s, then at least {MIN_BODY_RATE} bytes/s)")
        elif self._head_used:
            log.info("%s: request head not complete after %gs: 408 "
                     "(MLBUILD_HEADER_TIMEOUT)", self._peer(), self.header_timeout)
            self._refuse(408, f"request headers not received within "
                              f"{self.header_timeout:g} s")
        else:
            self._refuse(0, "")

    def _body_deadline(self, now: float) -> float:
        """When the body being received is late: the head's deadline plus the grace time
        (set in on_headers_complete), moved on by a second for every MIN_BODY_RATE bytes
        received."""
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            # The server is not reading (a request queued behind an earlier one, or a body
            # its app has not asked for yet; a client that sent "Expect: 100-continue"
            # waits for us): the client cannot be late. Its time starts again.
            self._head_deadline = now + self.header_timeout
            self._body_bytes = 0
            return self._head_deadline
        return self._head_deadline + self._body_bytes / MIN_BODY_RATE

    # -- the size ------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        # NOTE: runs for every read: _start_clock and _feed are inlined.
        if self._in_head:
            if self._head_deadline is None:  # the first bytes after a keep-alive request
                self._head_deadline = self.loop.time() + self.header_timeout
                if self._head_timer is None:
                    self._head_timer = self.loop.call_later(self.header_timeout,
                                                            self._head_timer_fired)
            used = self._head_used + len(data)
            if used > self.max_header_bytes:
                self._head_overflow(data)
                return
            self._head_used = used
        else:
            self._body_bytes += len(data)
        self._idle_since = None  # _unset_keepalive_if_required, inlined
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._parser_error()
        except httptools.HttpParserUpgrade:
            self._upgrade()

    def _feed(self, data: bytes) -> None:
        """uvicorn's data_received, plus the refusals raised in callbacks."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._parser_error()
        except httptools.HttpParserUpgrade:
            self._upgrade()

    def _parser_error(self) -> None:
        if self._refusal:
            self._refuse(self._refusal, f"more than {MAX_HEADER_COUNT} headers")
            return
        # NOTE: not uvicorn's send_400_response, which writes at once and closes: the
        # answers still owed to requests pipelined before this one were lost.
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        if self._in_head:
            self._refuse(400, msg)
        else:  # the body of the request being received is what is broken
            self._abandon_request(400, f"{msg} (its body)")

    def _upgrade(self) -> None:
        if self._should_upgrade():  # never with ws="none" (server.py), kept for others
            self.handle_websocket_upgrade()
            return
        # Answered as plain HTTP; the parser reads nothing after an upgrade request, so
        # the connection ends with that answer (else it would hang until a timeout).
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
        else:
            self.transport.close()

    def _head_overflow(self, data: bytes) -> None:
        """``data`` takes the head past the limit unless the head ends within the limit:
        feed the parser only what the limit leaves room for, then see."""
        limit = self.max_header_bytes
        if self._refusing:  # refused already, waiting for an earlier answer to finish
            self.flow.pause_reading()
            return
        while True:
            room = limit - self._head_used
            head, data = data[:room], data[room:]
            self._head_used = limit
            if head:
                self._feed(head)
            if self.transport.is_closing() or self.parser is None or self._refusing:
                return
            if self._in_head and self._head_used >= limit:  # the same head, unfinished
                self._refuse_too_large()
                return
            if not self._in_head:  # the head ended: the rest is its body
                self._body_bytes += len(data)
                self._feed(data)
                return
            # The request ended within the room; the rest starts the next head.
            if self._head_deadline is None:
                self._start_clock()
            used = self._head_used + len(data)
            if used <= limit:
                self._head_used = used
                self._feed(data)
                return

    def _refuse_too_large(self) -> None:
        url = getattr(self, "url", b"")  # uvicorn's: the URL of the head being parsed
        if self._head_used - len(url) <= _REQUEST_LINE_SLACK:
            status, what = 414, "request line"
        else:
            status, what = 431, "request head (request line and headers)"
        log.warning("%s: %s over %d bytes: %d (MLBUILD_MAX_HEADER_BYTES)", self._peer(),
                    what, self.max_header_bytes, status)
        self._refuse(status, f"{what} larger than {self.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        if len(self.headers) > MAX_HEADER_COUNT:
            log.warning("%s: more than %d headers: 431", self._peer(), MAX_HEADER_COUNT)
            self._refusal = 431
            raise _Refused
        if self._head_deadline is not None:  # the body's grace time (see _body_deadline)
            self._head_deadline += self.header_timeout
        else:  # a head begun in the read that ended the previous request
            self._start_clock()
        self._head_used = 0
        self._body_bytes = 0
        self._previous_cycle = self.cycle
        # uvicorn's, making cycles that write an answer in one write (onewrite.py). May
        # raise (a URL it cannot parse): still a head error.
        _on_headers_complete(self)
        self._in_head = False

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_deadline = None
        _on_message_complete(self)

    # -- refusing ------------------------------------------------------------------------
    def _abandon_request(self, status: int, message: str) -> None:
        """The request being received cannot be finished (its body is broken or late):
        answer ``status`` in its place, or just close when its answer has begun."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            # Answered already (without reading the whole body): nothing is owed to it.
            self._refuse(0, "")
            return
        cycle.scope[REFUSED_KEY] = status
        # Its app sees the client leave (http.disconnect), answers nothing and counts the
        # status given here; nothing it still sends is written.
        cycle.disconnected = True
        cycle.waiting_for_100_continue = False
        cycle.message_event.set()
        if cycle.response_started:  # mid-answer: no status can be sent any more
            self._refuse(0, "")
            return
        wait_for = None
        for i, (queued, _app) in enumerate(self.pipeline):
            if queued is cycle:  # not started: it never will, earlier answers come first
                del self.pipeline[i]
                wait_for = self.pipeline[0][0] if self.pipeline else self._previous_cycle
                break
        self._refuse(status, message, wait_for)

    def _refuse(self, status: int, message: str, wait_for=False) -> None:
        """Answer ``status`` (0: nothing) with ``Connection: close``, then drain and close.

        Nothing more is parsed on this connection: what the client still sends is read
        and dropped for at most LINGER seconds (see the module docstring).

        Args:
            wait_for: The request whose answer must go first (default: the last one
                parsed); None: answer now.
        """
        self._stop_clock()
        self.flow.pause_reading()
        cycle = self.cycle if wait_for is False else wait_for
        if cycle is not None and not cycle.response_complete:
            # Earlier requests (the client sent this one early, or pipelined) are still
            # being answered: ours follows the last of their answers. Nothing is read
            # meanwhile (an app reading its body may resume reading: see _head_overflow).
            def after_response() -> None:
                self.on_response_complete()
                if not self.transport.is_closing():
                    self._refuse(status, message, None)

            cycle.on_response = after_response  # this cycle's only, not every request's
            self._refusing = True
            return
        self._unset_keepalive_if_required()
        transport = self.transport
        if not status:  # nothing was sent, nothing is unread: close at once
            transport.close()
            return
        self.connections.discard(self)  # uvicorn no longer waits for it at shutdown
        body = _error(status, message)
        head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n" % len(body))
        transport.write(b"".join(head) + body)
        if transport.can_write_eof():
            transport.write_eof()
        transport.set_protocol(_Drain(transport, self.loop))
        self.flow.resume_reading()
        self.parser = None  # what it buffered of the head goes now

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "client"


class _Drain(asyncio.Protocol):
    """What a refused connection turns into: reads and drops anything the client still
    sends, and closes when the client does, or after LINGER seconds."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._timer = loop.call_later(LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes

    def connection_lost(self, exc) -> None:
        self._timer.cancel()


def protocol_class(header_timeout: float, max_header_bytes: int) -> type[HeadLimitedProtocol]:
    """The protocol class to give uvicorn (``uvicorn.Config(http=...)``) for these limits."""
    return type("HeadLimitedProtocol", (HeadLimitedProtocol,),
                {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes})
