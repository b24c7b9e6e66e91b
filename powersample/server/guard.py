"""Cross-site protection for a server on this machine: any web page the user visits can send requests to
http://127.0.0.1:8000, and DNS rebinding lets it read the answers. Three rules stop that (as local model servers do):

- Host: a request must name the server by the address it is bound to, a loopback name (localhost, *.localhost,
  127.0.0.0/8, ::1) or a name of `--allowed-host` ("*" allows any). A rebound name (evil.example -> 127.0.0.1)
  is none of them: 403. A server bound to every address (0.0.0.0, ::) cannot know its names and accepts any Host
  unless `--allowed-host` lists them.
- Origin: browsers send it on cross-site requests; one from an origin other than `--cors-origin` gets 403, unless
  it is the server's own: its host and port are the request's Host, and that Host is one the server was told
  (the bound address, a loopback name or an `--allowed-host` name, "*" included; not merely accepted because the
  server is bound to every address, so a rebound name still cannot POST). The playground's page (`GET /`) calls
  the API from there, and browsers send Origin on a same-origin POST too.
- CORS: off by default (no Access-Control-* headers, so a page cannot read an answer); `--cors-origin ORIGIN`
  allows that one origin, with its preflight requests.

(`read_json` adds the fourth: a body must be application/json, a type a page cannot send without a preflight.)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

WILDCARDS = ("", "0.0.0.0", "::")


def add_guards(app: FastAPI, bind_host: str, allowed_hosts: Sequence[str], cors_origin: str | None) -> None:
    """CORS for `cors_origin` (when given), inside the Host and Origin checks."""
    if cors_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[cors_origin],
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    app.add_middleware(HostGuard, bind_host=bind_host, allowed_hosts=tuple(allowed_hosts), cors_origin=cors_origin)


class HostGuard:
    """ASGI middleware refusing (403) a foreign Host or Origin; see the module docstring."""

    def __init__(self, app: ASGIApp, bind_host: str, allowed_hosts: tuple[str, ...], cors_origin: str | None):
        self.app, self.cors_origin = app, cors_origin
        names = {h.strip().lower().rstrip(".") for h in allowed_hosts}
        self.any_host = "*" in names or (bind_host in WILDCARDS and not names)
        self.names = names | {bind_host.strip("[]").lower()}

    def named(self, host: str) -> bool:
        """Whether `host` is a name the server was told: its bound address, a loopback name or an --allowed-host."""
        name = host_name(host)
        return "*" in self.names or name in self.names or is_loopback(name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            problem = self.problem(headers.get("host"), headers.get("origin"))
            if problem is not None:
                body = {
                    "error": {"message": problem, "type": "permission_error", "param": None, "code": "forbidden_host"}
                }
                await JSONResponse(body, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def problem(self, host: str | None, origin: str | None) -> str | None:
        """Why the request is refused, or None."""
        named = host is not None and self.named(host)
        if origin is not None and origin != self.cors_origin and not (named and same_origin(origin, host)):
            return (
                f"cross-origin requests from {origin!r} are refused; start the server with --cors-origin "
                f"{origin} to allow that origin"
            )
        if host is None or self.any_host or named:
            return None  # (no Host: an HTTP/1.0 client; no browser sends that)
        name = host_name(host)
        return (
            f"the Host {host!r} is not this server's; start it with --allowed-host {name} to allow that name "
            "(this check stops DNS rebinding)"
        )


def same_origin(origin: str, host: str | None) -> bool:
    """Whether `origin` ("http://127.0.0.1:8000") names the host and port of the request's `host` header."""
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and host is not None and scheme in ("http", "https") and rest.lower() == host.strip().lower()


def host_name(host: str) -> str:
    """The name of a Host header, without its port: "[::1]:8000" -> "::1", "Example.com.:80" -> "example.com"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def is_loopback(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
