"""Two cheap questions to the Docker engine, without the Docker SDK.

A no-op ``deploy`` must verify that the image is still in the engine and the
container still runs with its fingerprint, and must stay well under 0.3 s; importing
the SDK alone takes ~0.2 s. These calls speak the engine's HTTP API directly over its
Unix socket (or plain TCP) with the standard library. Anything else — or a TLS
``DOCKER_HOST`` — goes through :mod:`mlbuild.backends.docker`.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from urllib.parse import quote, urlsplit

API = "/v1.41"
TIMEOUT = 10.0


class Unavailable(Exception):
    """The engine could not be asked (not running, TLS, an odd DOCKER_HOST)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def _connection() -> http.client.HTTPConnection:
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if os.environ.get("DOCKER_TLS_VERIFY"):
        raise Unavailable("TLS")
    u = urlsplit(host)
    if u.scheme == "unix":
        return _UnixConnection(u.path, TIMEOUT)
    if u.scheme in ("tcp", "http"):
        return http.client.HTTPConnection(u.hostname, u.port or 2375, timeout=TIMEOUT)
    raise Unavailable(host)


def inspect(kind: str, name: str) -> dict | None:
    """``GET /{images|containers}/NAME/json``: the object, or None when there is none.

    Raises:
        Unavailable: the engine could not be asked.
    """
    conn = _connection()
    try:
        conn.request("GET", f"{API}/{kind}/{quote(name, safe='')}/json")
        r = conn.getresponse()
        body = r.read()
    except OSError as e:
        raise Unavailable(str(e)) from e
    finally:
        conn.close()
    if r.status == 404:
        return None
    if r.status != 200:
        raise Unavailable(f"{r.status} {body[:200]!r}")
    return json.loads(body)
