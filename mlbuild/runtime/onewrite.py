"""An answer of known length in one write: its head held until its body comes.

uvicorn's httptools protocol writes a response's head (status line and headers) as the
``http.response.start`` message arrives and its body as ``http.response.body`` does: two
``send()`` system calls and two TCP segments for an answer that fits in one. On loopback
(and between containers of one host) the receiving side of each segment is processed on
the sender's CPU too. Two servers sharing one CPU under the same load (bench/serve.py's
2-row Ridge, ~200 us a request) answered ~4 % more requests with one write each, at
the same count of instructions (callgrind). Go's net/http and nginx send a small
answer's head and body together the same way.

:class:`OneWriteCycle` is uvicorn's request cycle with one change: the head of an answer
that has a ``content-length`` above zero (and is not the answer to a HEAD) is held and
written together with the first piece of its body. Everything else is uvicorn's: header
validation, keep-alive, chunked answers (written as uvicorn writes them: a stream's head
goes at once, so a client sees the status before the first chunk), 100-continue. An app
that starts an answer and never sends its body gets what uvicorn does then: the head,
and the connection closed.

The protocol (headlimits.HeadLimitedProtocol) makes its cycles with
:func:`on_headers_complete` and writes through a :class:`HeadHolder` around its
transport, made once per connection (cycles take the protocol's transport).
"""

from __future__ import annotations

import types

from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

_send = RequestResponseCycle.send

# A body up to this size is joined to its head (one copy); a larger one goes in a
# second write of its own right after the head (copying it would cost more than a call).
JOIN_LIMIT = 64 * 1024


class HeadHolder:
    """The transport a connection's request cycles write through.

    Passes every write on, except the one right after :meth:`hold`: that one (a head) is
    kept and goes out with the next write, or at :meth:`flush`, or before a close.
    """

    __slots__ = ("_transport", "_hold", "_head")

    def __init__(self, transport):
        self._transport = transport
        self._hold = False
        self._head: bytes | None = None

    def hold(self) -> None:
        self._hold = True

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if len(data) <= JOIN_LIMIT:
                self._transport.write(head + data)
                return
            self._transport.write(head)
        elif self._hold:
            self._hold = False
            self._head = data
            return
        self._transport.write(data)

    def flush(self) -> None:
        """Write a held head now; forget a hold nothing was written under."""
        self._hold = False
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str):  # the rest of the transport's interface, unchanged
        return getattr(self._transport, name)


class OneWriteCycle(RequestResponseCycle):
    """uvicorn's cycle, writing an answer of known length in one write (module docstring).
    Its ``transport`` is a :class:`HeadHolder`."""

    def send(self, message):
        # NOTE: not async: a body (and anything after the head) goes straight to
        # uvicorn's send, without a coroutine of ours around it.
        if self.response_started or message["type"] != "http.response.start":
            return _send(self, message)
        return self._send_head(message)

    async def _send_head(self, message) -> None:
        holder = self.transport
        holder.hold()
        try:
            await _send(self, message)
        except BaseException:
            holder.flush()
            raise
        if (self.chunked_encoding is not False or self.expected_content_length <= 0
                or self.scope["method"] == "HEAD" or not self.response_started):
            holder.flush()  # a stream, an empty or HEAD answer, or nothing was written


def _making(cycle_class: type) -> types.FunctionType:
    """uvicorn's ``HttpToolsProtocol.on_headers_complete``, making ``cycle_class`` cycles.

    The function is uvicorn's own code, run with its module's globals but for the name
    ``RequestResponseCycle``: nothing of uvicorn is copied or patched."""
    original = HttpToolsProtocol.on_headers_complete
    names = dict(httptools_impl.__dict__, RequestResponseCycle=cycle_class)
    return types.FunctionType(original.__code__, names, original.__name__,
                              original.__defaults__, original.__closure__)


# uvicorn's on_headers_complete, making OneWriteCycle cycles: what the protocol calls.
on_headers_complete = _making(OneWriteCycle)
