"""The request bodies a profile sends, and their check before any load.

Three sources, as ``mlbuild profile --data`` takes them:

    FILE.json holding a JSON list   each element is one body (re-encoded as JSON)
    any other FILE                  Azure ML v1's format: one body per line (blank lines
                                    skipped), each sent as it is
    no --data                       the service's schema input sample, one body

Each :class:`Body` remembers where it came from (file and line), so a body the service
refuses is named precisely: ``data.txt:7: the service answered 400 ...``.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from mlbuild.errors import InvalidInput, StepFailed


@dataclass(frozen=True)
class Body:
    """One request body and where it came from (``line`` 0: the whole file)."""

    data: bytes
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


def load_bodies(path: Path | None, sample: Path | None, shown: str | None = None,
                sample_shown: str | None = None) -> list[Body]:
    """The bodies of ``path`` (see the module docstring), else of the schema sample.

    Args:
        path: the --data file, or None.
        sample: the service's schema input sample (used without ``path``), or None.
        shown, sample_shown: how messages name the files (default: the paths).

    Raises:
        InvalidInput: no data at all, an unreadable or empty file, a JSON list that is
            empty, or an element of it that is not JSON-encodable.
    """
    if path is None:
        if sample is None:
            raise InvalidInput("no request bodies to send: the service has no schema "
                               "input sample and no --data was given",
                               hint="pass --data FILE (one request body per line, or a "
                                    "JSON list of bodies)")
        return [Body(_read(sample, sample_shown).strip(), sample_shown or str(sample), 0)]
    shown = shown or str(path)
    raw = _read(path, shown)
    if not raw.strip():
        raise InvalidInput(f"--data {shown}: the file is empty",
                           hint="one request body per line, or a JSON list of bodies")
    if raw.lstrip().startswith(b"["):
        try:
            items = json.loads(raw)
        except ValueError:
            items = None  # a line-per-body file whose first body is a JSON array
        if isinstance(items, list):
            if not items:
                raise InvalidInput(f"--data {shown}: the JSON list is empty",
                                   hint="give it at least one request body")
            # NOTE: a string element is a body as it is (Azure's text inputs), anything
            # else is encoded as JSON; element k is named as line k+1 of the list.
            return [Body(x.encode() if isinstance(x, str) else
                         json.dumps(x, separators=(",", ":")).encode(), shown, k + 1)
                    for k, x in enumerate(items)]
    bodies = [Body(line.strip(), shown, n) for n, line in enumerate(raw.splitlines(), 1)
              if line.strip()]
    return bodies


def _read(path: Path, shown: str | None) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidInput(f"--data {shown or path}: {e.strerror or e}") from None


def check_bodies(bodies: Sequence[Body], url: str, *, content_type: str = "application/json",
                 authorization: str | None = None, timeout: float = 60.0,
                 say: Callable[[str], None] | None = None) -> None:
    """Send each distinct body once; an answer other than 2xx stops here.

    Raises:
        InvalidInput: a body answered 4xx (the data's fault), naming its file and line
            and quoting the service's answer.
        StepFailed: a body answered 5xx (run() failed on it, named the same way), or the
            service did not answer.
    """
    from urllib.parse import urlsplit

    u = urlsplit(url)
    seen: set[bytes] = set()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    headers = {"Content-Type": content_type}
    if authorization:
        headers["Authorization"] = authorization
    try:
        for b in bodies:
            if b.data in seen:
                continue
            seen.add(b.data)
            conn.request("POST", u.path or "/", body=b.data, headers=headers)
            r = conn.getresponse()
            answer = r.read()
            if r.status >= 400:
                text = answer.decode("utf-8", "replace").strip()
                msg = (f"{b.where}: the service answered {r.status} to this request body"
                       + (f": {text[:300]}" if text else ""))
                if r.status < 500:
                    raise InvalidInput(msg, hint="fix or remove that body; nothing was "
                                                 "loaded yet")
                # NOTE: a 5xx is run() failing on it: the data or the script, not a load
                # question either way, and profiling it would measure errors.
                raise StepFailed("profile", msg, hint="see the service's log (run() "
                                 "raised); nothing was loaded yet")
    except (OSError, http.client.HTTPException) as e:
        raise StepFailed("profile", f"checking the request bodies: {url} does not "
                                    f"answer: {getattr(e, 'strerror', None) or e}") from None
    finally:
        conn.close()
    if say:
        say(f"  checked     {len(seen)} distinct request bod{'y' if len(seen) == 1 else 'ies'}")
