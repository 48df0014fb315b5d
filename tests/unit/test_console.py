"""The web console's routes and files, without a browser: public, with the CSP and the right types,
answered as text (the same body on API Gateway), and files that keep to what the CSP allows."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from batch_api.handlers import api
from batch_api.handlers.console import ASSETS, ASSETS_DIR, CONTENT_SECURITY_POLICY, asset_text
from tests.unit.api_events import proxy_event
from tests.unit.builders import FakeClock, make_deps
from tests.unit.conftest import LambdaContext

pytestmark = pytest.mark.unit

EXPECTED_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@pytest.fixture
def app() -> object:
    return api.create_app(make_deps(clock=FakeClock(), api_keys=["sk-only-this-key"]))


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/console", "text/html; charset=utf-8"),
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/app.css", "text/css; charset=utf-8"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_the_console_is_public_with_a_strict_csp_and_its_content_type(
    app: object, lambda_context: LambdaContext, path: str, content_type: str, method: str
) -> None:
    answer = api.handle(app, proxy_event(method, path), lambda_context)  # type: ignore[arg-type]

    assert answer["statusCode"] == 200
    headers = answer["multiValueHeaders"]
    assert headers["Content-Type"] == [content_type]
    assert headers["Content-Security-Policy"] == [EXPECTED_CSP] == [CONTENT_SECURITY_POLICY]
    assert headers["X-Content-Type-Options"] == ["nosniff"]
    assert headers["Referrer-Policy"] == ["no-referrer"]
    assert answer["isBase64Encoded"] is False  # text, as /docs: API Gateway passes it through unchanged
    if method == "GET":
        assert answer["body"] == (ASSETS_DIR / ASSETS[path][0]).read_text()
    else:
        assert answer["body"] == ""


def test_a_trailing_slash_is_sent_to_the_page_by_a_relative_link(
    app: object, lambda_context: LambdaContext
) -> None:
    answer = api.handle(app, proxy_event("GET", "/console/"), lambda_context)  # type: ignore[arg-type]

    assert answer["statusCode"] == 301
    assert answer["multiValueHeaders"]["Location"] == ["../console"]  # stays under a stage prefix


def test_the_console_opens_no_door_to_the_api(app: object, lambda_context: LambdaContext) -> None:
    for path in ("/v1/batches", "/console/v1/batches", "/console/app.js/x", "/console/index.html"):
        answer = api.handle(app, proxy_event("GET", path), lambda_context)  # type: ignore[arg-type]
        assert answer["statusCode"] == 401, path


def test_the_console_is_not_in_the_openapi_document(app: object, lambda_context: LambdaContext) -> None:
    document = api.handle(app, proxy_event("GET", "/openapi.json"), lambda_context)  # type: ignore[arg-type]
    assert "/console" not in document["body"]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.script_bodies: list[str] = []
        self.in_script = False
        self.styles = 0
        self.style_attributes: list[str] = []
        self.handler_attributes: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script":
            self.scripts.append(values)
            self.in_script = True
        if tag == "style":
            self.styles += 1
        for name, value in attrs:
            if name == "style":
                self.style_attributes.append(tag)
            if name.startswith("on"):
                self.handler_attributes.append(f"{tag} {name}")
            if name in ("src", "href", "action") and value is not None:
                self.urls.append(value)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_script = False

    def handle_data(self, data: str) -> None:
        if self.in_script and data.strip():
            self.script_bodies.append(data)


def test_the_page_has_no_inline_code_and_only_relative_urls() -> None:
    page = _Page()
    page.feed(asset_text("index.html"))

    assert page.scripts == [{"src": "console/app.js", "defer": None}]
    assert page.script_bodies == []  # no inline script
    assert page.styles == 0 and page.style_attributes == []  # no inline style
    assert page.handler_attributes == []  # no onclick=...
    for url in page.urls:
        # relative to the page (so under a stage prefix), a fragment, or the empty data: icon
        assert url.startswith(("console/", "#")) or url == "data:,", url


@pytest.mark.parametrize("name", sorted({name for name, _type in ASSETS.values()}))
def test_no_file_names_another_origin(name: str) -> None:
    text = asset_text(name)
    assert not re.search(r"(?i)\b(https?|wss?):", text), name
    assert "//" not in re.sub(r"(?m)//.*$|/\*.*?\*/", "", text).replace("'//'", ""), name  # no //host
    assert "@import" not in text and "url(" not in text  # styles load nothing


def test_the_script_renders_server_strings_as_text_and_keeps_only_the_key() -> None:
    script = asset_text("app.js")
    assert "innerHTML" not in script and "outerHTML" not in script and "insertAdjacentHTML" not in script
    assert "document.write" not in script and "eval(" not in script and "new Function" not in script
    assert "localStorage" not in script and "document.cookie" not in script
    assert re.findall(r"sessionStorage\.setItem\(([^,]+),", script) == ["KEY_STORAGE"]


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js not installed")
def test_the_script_parses() -> None:
    done = subprocess.run(
        ["node", "--check", str(ASSETS_DIR / "app.js")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
