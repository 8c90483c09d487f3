"""The one read a no-op deploy makes -- GET a Deployment -- without lightkube.

A no-op deploy of a kubernetes target asks the API server whether each Deployment still
carries its fingerprint and is available. Through lightkube that costs ~0.22 s before
the request (0.12 s of imports, 0.1 s building its HTTP client) on a run whose whole
process-target counterpart takes ~0.16 s. This module reads the kubeconfig itself and
makes the request with the standard library, for the kubeconfigs whose credentials are
plain: a bearer token (``token``, ``tokenFile``) or a client certificate and key in files
or inline, over http or https with the cluster's CA. Anything else (``exec`` or
``auth-provider`` plugins, basic auth, a proxy, several kubeconfig files) raises
:class:`Unsupported`, and the caller asks lightkube instead -- as it does for every
answer that is not 200 or 404, so that errors read the same either way.
(The docker target's check does the same with the engine: backends/dockerapi.py.)
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path


class Unsupported(Exception):
    """This kubeconfig or answer is one for lightkube: ask it instead."""


def _kubeconfig_path(given: str | None) -> Path:
    raw = given or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube/config")
    if os.pathsep in raw.strip(os.pathsep):
        raise Unsupported("several kubeconfig files")
    path = Path(raw.strip(os.pathsep)).expanduser()
    if not path.is_file():
        raise Unsupported("no kubeconfig file")
    return path


def _named(items, name: str) -> dict:
    for item in items or ():
        if item.get("name") == name:
            return item
    raise Unsupported(f"no entry {name!r}")


def _file_or_data(entry: dict, key: str, base: Path, tmp: list) -> str | None:
    """A path for ``key`` (a file, relative to the kubeconfig) or ``key-data`` (inline,
    base64: written to a private temporary file that the caller removes)."""
    if entry.get(f"{key}-data"):
        fd, name = tempfile.mkstemp(prefix="mlbuild-kube-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(base64.b64decode(entry[f"{key}-data"]))
        tmp.append(name)
        return name
    if entry.get(key):
        return str((base / entry[key]).expanduser())
    return None


def get_deployment(context: str | None, namespace: str, name: str,
                   kubeconfig: str | None = None, timeout: float = 10.0) -> dict | None:
    """The Deployment ``namespace/name`` as the API server returns it; None on 404.

    Raises:
        Unsupported: The kubeconfig needs lightkube, or the answer was neither 200 nor
            404, or the server could not be reached (lightkube then says why).
    """
    import http.client
    from urllib.parse import urlsplit

    import yaml

    path = _kubeconfig_path(kubeconfig)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise Unsupported(str(exc)) from None
    ctx = _named(config.get("contexts"), context or config.get("current-context") or "")
    ctx = ctx.get("context") or {}
    cluster = _named(config.get("clusters"), ctx.get("cluster", "")).get("cluster") or {}
    user = _named(config.get("users"), ctx.get("user", "")).get("user") or {}
    if set(user) - {"token", "tokenFile", "client-certificate", "client-certificate-data",
                    "client-key", "client-key-data"} or \
            set(cluster) - {"server", "certificate-authority", "certificate-authority-data",
                            "insecure-skip-tls-verify"}:
        raise Unsupported("credentials or cluster settings for lightkube")
    base = path.parent
    headers = {"Accept": "application/json"}
    token = user.get("token")
    if user.get("tokenFile"):
        token = (base / user["tokenFile"]).read_text().strip()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    u = urlsplit(cluster.get("server", ""))
    tmp: list[str] = []
    try:
        if u.scheme == "https":
            import ssl

            context_ = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if cluster.get("insecure-skip-tls-verify"):
                context_.check_hostname = False
                context_.verify_mode = ssl.CERT_NONE
            else:
                ca = _file_or_data(cluster, "certificate-authority", base, tmp)
                if ca:
                    context_.load_verify_locations(cafile=ca)
                else:
                    context_.load_default_certs()
            cert = _file_or_data(user, "client-certificate", base, tmp)
            if cert:
                context_.load_cert_chain(cert, _file_or_data(user, "client-key", base, tmp))
            conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout,
                                               context=context_)
        elif u.scheme == "http":
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        else:
            raise Unsupported(f"server {u.scheme!r}")
        prefix = u.path.rstrip("/")
        try:
            conn.request("GET", f"{prefix}/apis/apps/v1/namespaces/{namespace}/deployments/"
                                f"{name}", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise Unsupported(str(exc)) from None
        finally:
            conn.close()
    except (OSError, ValueError) as exc:  # a certificate file that does not load, ...
        raise Unsupported(str(exc)) from None
    finally:
        for name_ in tmp:
            os.unlink(name_)
    if resp.status == 404:
        return None
    if resp.status != 200:
        raise Unsupported(f"answered {resp.status}")
    return json.loads(body)
