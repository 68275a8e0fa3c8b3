"""What a reverse proxy accepts as a request's target and framing, checked before routing.
Pure: a request outside the upstreams' path space, or framed in a way the proxy would forward
wrongly, is refused with the ``ProxyError`` a client gets."""

from __future__ import annotations

from proxy.errors import BadRequest, NotSupported


def check_target(method: str, raw_path: str, path: str) -> None:
    """Refuse what would make this an open proxy or escape the upstream's path space."""
    if method == "CONNECT":
        raise BadRequest("CONNECT is not supported: this is a reverse proxy")
    if raw_path == "*":
        raise NotSupported(
            "OPTIONS * (a request about the server as a whole) is not supported: "
            "send OPTIONS to a path"
        )
    if not raw_path.startswith("/") or raw_path.startswith("//"):
        raise BadRequest("absolute-form request targets are not accepted")
    raw = raw_path.split("?", 1)[0].lower()
    if "%2f" in raw or "%5c" in raw or "\\" in raw:
        raise BadRequest("encoded slashes are not accepted in the path")
    segments = path.split("/")
    if ".." in segments or "." in segments or "%2e" in raw:
        raise BadRequest("path traversal is not accepted")


def check_framing(transfer_encoding: str | None) -> None:
    """Only ``chunked`` framing is understood: a body also gzip- or br-coded in transit would be
    forwarded as if it were not (RFC 9112 6.1: answer 501 to a coding not understood)."""
    if transfer_encoding is not None and transfer_encoding.strip().lower() != "chunked":
        raise NotSupported(
            "Transfer-Encoding other than 'chunked' is not supported "
            "(send the body chunked, or with Content-Length and a Content-Encoding)"
        )
