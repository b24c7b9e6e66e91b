"""The playground: `GET /` serves one static page (`static/playground.html`, vanilla JS, no build step, nothing
fetched from elsewhere) that runs one chain through `POST /v1/completions` with the trace extension
(`stream_options.include_trace`, see `sse.py`) and draws it live: the current text coloured by what wrote each span,
each proposal's cut and verdict, and log p of the state across steps.

The page is rendered once, when the app is built: the registry's methods and their knobs, and the server's defaults,
fill its placeholders. It holds no data, so it needs no API key (the page asks for one and keeps it in
sessionStorage); the Host guard applies as everywhere. Its Content-Security-Policy allows only its own inline script
and style (by their SHA-256) and requests to its own origin.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import typing
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from powersample.config import SPECS, SamplerConfig, knob_help
from powersample.samplers.registry import REGISTRY

PAGE = "static/playground.html"
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def add_playground(app: FastAPI, defaults: SamplerConfig) -> None:
    """`GET /`: the page, with its CSP and no-sniff, no-referrer headers."""
    body = render(defaults)
    headers = {
        "Content-Security-Policy": content_security_policy(body),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)


def render(defaults: SamplerConfig) -> str:
    """The page with its placeholders filled: the methods (the default selected), each method's knobs, and the main
    knobs' defaults."""
    page = resources.files("powersample.server").joinpath(PAGE).read_text("utf-8")
    values = {
        "methods": _methods(defaults.method),
        "knobs": _knobs(defaults),
        "alpha": f"{defaults.alpha:g}",
        "mcmc_steps": str(defaults.mcmc_steps),
        "block_count": str(defaults.block_count),
        "max_tokens": str(defaults.max_new_tokens),
    }
    for name, value in values.items():
        page = page.replace("{{" + name + "}}", value)
    return page


def content_security_policy(page: str) -> str:
    """Nothing but the page's own inline script and style (by hash), and fetches to its own origin."""
    hashes = {"script": [], "style": []}
    for kind, text in _INLINE.findall(page):
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        hashes[kind].append(f"'sha256-{digest}'")
    return (
        f"default-src 'none'; script-src {' '.join(hashes['script'])}; style-src {' '.join(hashes['style'])}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _methods(default: str) -> str:
    return "".join(
        f'<option value="{html.escape(name)}" title="{html.escape(m.summary)}"'
        f"{' selected' if name == default else ''}>{html.escape(name)}</option>"
        for name, m in REGISTRY.items()
    )


def _knobs(defaults: SamplerConfig) -> str:
    """One labelled input per (method, knob), shown by the page for the chosen method only: a number, or text in
    the knob's declared form (power-pt's ladder); empty where the default is None (the server's own then)."""
    types = typing.get_type_hints(SamplerConfig)
    rows = []
    for name, m in REGISTRY.items():
        for knob in m.knobs:
            value, spec = getattr(defaults, knob), SPECS[knob]
            if spec.pattern is not None:
                kind = f'type="text" placeholder="{html.escape(spec.shown)}"'  # the server checks its form'
            else:
                kind = f'type="number" step="{"1" if types[knob] is int else "any"}" min="0"'
            rows.append(
                f'<label class="knob" data-method="{html.escape(name)}" title="{html.escape(knob_help(knob))}">'
                f'<span>{html.escape(knob)}</span><input name="{knob}" {kind} '
                f'value="{"" if value is None else html.escape(str(value))}"></label>'
            )
    return "\n    ".join(rows)
