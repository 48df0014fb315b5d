"""The web console: three static files (`batch_api/console/`) served by the API's own resolver, without
authentication, like `/docs`. The page asks for an API key and calls the API with it, so a key only
ever sees its own project.

The files are read once, at the first request, and answered as text (never base64): the same body
locally and through API Gateway. Every answer carries a strict Content-Security-Policy: scripts, styles
and connections from this origin only, no inline code, no framing, no base URL, no form posts.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response

ASSETS_DIR = Path(__file__).resolve().parent.parent / "console"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
# route path -> (file under ASSETS_DIR, Content-Type)
ASSETS = {
    "/console": ("index.html", "text/html; charset=utf-8"),
    "/console/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/console/app.css": ("app.css", "text/css; charset=utf-8"),
}
# Powertools matches "/console/" to the "/console" route; there the page's relative URLs would resolve
# one level too deep, so it is sent to "../console" (relative: it stays under the stage prefix)
PATHS = frozenset(ASSETS) | {"/console/"}


@cache
def asset_text(name: str) -> str:
    return (ASSETS_DIR / name).read_text(encoding="utf-8")


def register_console_routes(app: APIGatewayRestResolver) -> None:
    """GET (and so HEAD) routes for the console's files; answered outside the OpenAPI document."""
    for path, (name, content_type) in ASSETS.items():
        _register(app, path, name, content_type)


def _register(app: APIGatewayRestResolver, path: str, name: str, content_type: str) -> None:
    @app.get(path, include_in_schema=False)
    def asset():  # no return type: Powertools would validate and re-encode the body
        if app.current_event.path.endswith("/"):
            return Response(status_code=301, headers={**SECURITY_HEADERS, "Location": "../console"}, body="")
        return Response(
            status_code=200, content_type=content_type, body=asset_text(name), headers=SECURITY_HEADERS
        )
