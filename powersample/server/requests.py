"""The HTTP edge of a request: reading its JSON body (size, time, media type), checking its API key, and answering
every failure as OpenAI's error JSON (`protocol.ApiError`), tracebacks never."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from typing import Any

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from powersample.errors import is_unicode, one_line
from powersample.server.protocol import ApiError, json_bytes


class JsonResponse(JSONResponse):
    """Every JSON answer of the server, encoded as SSE events are (`protocol.json_bytes`: non-finite numbers as
    null)."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def client_closed() -> ApiError:
    """The answer to a request whose client left before it was answered."""
    return ApiError(499, "the client closed the request", code="client_closed")


async def read_json(request: Request, limit: int, timeout: float = 30.0) -> Any:
    """The body parsed as JSON: 413 past `limit` bytes (by Content-Length, and while streaming), 408 when it takes
    longer than `timeout` seconds to arrive, 415 unless it is application/json (a browser's cross-site "simple
    request" cannot send that type), 499 when the client leaves halfway."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "the Content-Length header is not a number")
        if int(declared) > limit:
            raise _too_large(limit)
    try:
        raw = await asyncio.wait_for(_read_body(request, limit), timeout)
    except ClientDisconnect:
        raise client_closed() from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s", code="body_timeout") from None
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(
            415,
            f"the request body must be sent as 'Content-Type: application/json', not {media or 'no type'!r}",
            code="unsupported_media_type",
        )
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON: {one_line(e)}", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(raw):
        check_text(data)
    return data


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # JSON's only way to spell a surrogate: \uD800-\uDFFF


def check_text(data: Any) -> None:
    """A 400 naming a string (or field name) of a parsed body that is not Unicode text: JSON may spell a lone
    surrogate ("\\ud800"), which no tokenizer can encode, nor any answer carry. Checked on every body before any
    work, so prompts, messages, stop strings and every other text field are covered alike. Iterative: a deeply
    nested body cannot exhaust the stack."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str) and not is_unicode(value):
            where = ".".join(map(str, path)) or "body"
            raise ApiError(
                400,
                f"'{where}' is not valid Unicode text (it holds a lone surrogate, such as \\ud800): send UTF-8 text",
                param=str(path[0]) if path else None,
                code="invalid_text",
            )
        if isinstance(value, dict):
            for key, item in value.items():
                if not is_unicode(key):
                    raise ApiError(400, f"a field name is not valid Unicode text: {ascii(key)}", code="invalid_text")
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body exceeds the server's limit of {limit} bytes", code="body_too_large")


def authenticate(api_key: str | None):
    """A dependency refusing (401) requests without `Authorization: Bearer <api_key>`; no check without a key. With a
    key it declares HTTP bearer auth, so the served document's routes that need the key say so (`securitySchemes`);
    the check itself is `key_ok`'s."""
    if api_key is None:

        async def open_to_all() -> None:
            return None

        return open_to_all

    bearer = HTTPBearer(auto_error=False, scheme_name="bearer", description="the server's --api-key")

    async def check(request: Request, _: Any = Security(bearer)) -> None:
        if not key_ok(request, api_key):
            raise ApiError(
                401,
                "a valid API key is required: send 'Authorization: Bearer <key>'",
                kind="authentication_error",
                code="invalid_api_key",
            )

    return check


def key_ok(request: Request, api_key: str | None) -> bool:
    """True without a key, or when the request sends 'Authorization: Bearer <api_key>' (compared in constant time)."""
    if api_key is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), api_key.encode())


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JsonResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        body = ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", kind=kind).body()
        return JsonResponse(body, status_code=error.status_code, headers=error.headers)  # 405 keeps its Allow

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JsonResponse(ApiError(400, str(error.errors()[:1])).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        body = ApiError(500, f"internal error: {one_line(error)}", kind="server_error").body()
        return JsonResponse(body, status_code=500)
