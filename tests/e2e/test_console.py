"""The web console in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by selenium)
against `batch-api serve` with two API keys, i.e. two projects, and a slow mock upstream so that a
running batch can be watched. Every wait is on the page's state (WebDriverWait), never a fixed sleep.

Screenshots of the main pages are written to docs/console-*.png by this run (the README shows one).
Without Chromium the tests are skipped, with the one reason that says how to install it."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import io
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import jsonl, request_line, wait_for
from tests.support.server import ServerProcess

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("Chromium not installed: apt-get install chromium chromium-driver", allow_module_level=True)

from selenium import webdriver  # noqa: E402  (the dev extra; only once Chromium is known to be here)
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

KEY_A = "sk-console-a-0123456789"
KEY_B = "sk-console-b-0123456789"
KEY_DOCS = "sk-console-docs-0123456789"  # a project of its own, so the screenshots show a tidy list
CHAT = "/v1/chat/completions"
DOCS = Path(__file__).resolve().parents[2] / "docs"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)
# requests one at a time, 0.15 s each (about 6 a second), counts recorded every 0.1 s
SLOW = (
    "--mock-latency",
    "0.15",
    "--chunk-max-lines",
    "10",
    "--chunk-concurrency",
    "1",
    "--requests-per-chunk",
    "1",
)
XSS = '<img src=x onerror="window.__xss=1">'
WAIT = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("console") / "data"
    keys = [arg for key in (KEY_A, KEY_B, KEY_DOCS) for arg in ("--api-key", key)]
    process = ServerProcess(data_dir, *keys, *SLOW, env={"BATCH_API_PROGRESS_INTERVAL_SECONDS": "0.1"})
    process.start()
    yield process
    process.stop()


class Browser:
    """One Chromium for the module; the browser log is kept across reads (reading it drains it)."""

    def __init__(self, driver: WebDriver, console_url: str, downloads: Path) -> None:
        self.driver = driver
        self.console_url = console_url
        self.downloads = downloads
        self.log: list[dict[str, Any]] = []

    def wait(self, condition: Callable[[WebDriver], Any], timeout: float = WAIT, message: str = "") -> Any:
        return WebDriverWait(
            self.driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
        ).until(condition, message)

    def open(self, fragment: str = "") -> None:
        self.driver.get(self.console_url + fragment)
        self.wait(lambda d: d.execute_script("return document.readyState") == "complete")

    def sign_in(self, key: str) -> None:
        """A fresh tab state (nothing in session storage), then the key prompt."""
        self.forget()
        self.wait(lambda d: d.find_element(By.ID, "login-view").is_displayed(), message="the key prompt")
        self.driver.find_element(By.ID, "api-key").send_keys(key)
        self.driver.find_element(By.ID, "login-submit").click()
        self.wait(lambda d: d.find_element(By.ID, "list-view").is_displayed(), message="the batch list")

    def forget(self) -> None:
        """The console's page, loaded anew with nothing in session storage."""
        self.open("#/")
        self.driver.execute_script("sessionStorage.clear()")
        self.driver.refresh()
        self.wait(lambda d: d.execute_script("return document.readyState") == "complete")

    def text(self, css: str) -> str:
        return str(self.driver.find_element(By.CSS_SELECTOR, css).text)

    def present(self, css: str) -> bool:
        return bool(self.driver.find_elements(By.CSS_SELECTOR, css))

    def browser_log(self) -> list[dict[str, Any]]:
        self.log += self.driver.get_log("browser")
        return self.log

    def screenshot(self, name: str) -> None:
        DOCS.mkdir(exist_ok=True)
        self.driver.save_screenshot(str(DOCS / name))


@pytest.fixture(scope="module")
def browser(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    root = tmp_path_factory.mktemp("chromium")
    downloads = root / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={root / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    try:
        yield Browser(driver, f"http://127.0.0.1:{server.port}/console", downloads)
    finally:
        driver.quit()


@pytest.fixture(autouse=True)
def no_csp_violations(browser: Browser) -> Iterator[None]:
    """After every test: the browser reported no Content-Security-Policy violation (nor any script error)."""
    yield
    problems = [
        entry["message"]
        for entry in browser.browser_log()
        if "Content Security Policy" in entry["message"]
        or "Refused to" in entry["message"]
        or "Uncaught" in entry["message"]
    ]
    assert problems == []


def client(server: ServerProcess, key: str) -> Any:
    return server.client(api_key=key)


def create_batch(
    server: ServerProcess, key: str, lines: list[Any], metadata: dict[str, str] | None = None
) -> Any:
    sdk = client(server, key)
    file = sdk.files.create(file=("requests.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return sdk.batches.create(
        input_file_id=file.id, endpoint=CHAT, completion_window="24h", metadata=metadata
    )


def chat_lines(count: int, failing: set[int] = frozenset(), prefix: str = "req") -> list[dict[str, Any]]:  # type: ignore[assignment]
    """`count` chat requests; those in `failing` ask for n=0, which the mock answers 400."""
    lines = []
    for i in range(count):
        line = request_line(CHAT, i, custom_id=f"{prefix}-{i}")
        if i in failing:
            line["body"]["n"] = 0
        lines.append(line)
    return lines


def progress_value(browser: Browser, batch_id: str) -> int:
    bar = browser.driver.find_element(By.CSS_SELECTOR, f'tr[data-batch-id="{batch_id}"] progress')
    return int(bar.get_attribute("data-done") or 0)


def cancel_quietly(server: ServerProcess, key: str, batch_id: str) -> None:
    sdk = client(server, key)
    if sdk.batches.retrieve(batch_id).status in ("validating", "in_progress", "finalizing"):
        sdk.batches.cancel(batch_id)
    wait_for(sdk, batch_id)


# ---------------------------------------------------------------- the tests


def test_the_console_asks_for_a_key_and_refuses_a_wrong_one(server: ServerProcess, browser: Browser) -> None:
    browser.forget()
    browser.wait(lambda d: d.find_element(By.ID, "login-view").is_displayed())
    browser.driver.find_element(By.ID, "api-key").send_keys("sk-not-a-key-of-this-server")
    browser.driver.find_element(By.ID, "login-submit").click()
    browser.wait(lambda d: d.find_element(By.ID, "login-error").is_displayed(), message="a refusal")
    assert "refused" in browser.text("#login-error")
    assert browser.driver.execute_script("return sessionStorage.length") == 0

    browser.sign_in(KEY_A)
    stored = browser.driver.execute_script(
        "return [sessionStorage.length, Object.values(sessionStorage), localStorage.length, document.cookie]"
    )
    assert stored == [1, [KEY_A], 0, ""]  # the key, in session storage, and nothing else anywhere

    browser.driver.find_element(By.ID, "forget-key").click()
    browser.wait(lambda d: d.find_element(By.ID, "login-view").is_displayed())
    assert browser.driver.execute_script("return sessionStorage.length") == 0


def test_a_running_batch_shows_its_progress_moving(server: ServerProcess, browser: Browser) -> None:
    batch = create_batch(server, KEY_A, chat_lines(300), metadata={"job": "progress"})
    try:
        browser.sign_in(KEY_A)
        row = f'tr[data-batch-id="{batch.id}"]'
        browser.wait(lambda d: progress_value(browser, batch.id) > 0, message="progress starts")
        first = progress_value(browser, batch.id)
        browser.wait(lambda d: progress_value(browser, batch.id) >= first + 5, message="progress moves")
        assert browser.text(f"{row} .status") == "in progress"
        assert browser.text(f"{row} progress") == "" and "/ 300" in browser.text(f"{row} .progress-label")
        # a rate and an ETA once two polls have seen the count move
        browser.wait(lambda d: browser.text(f"{row} .rate").endswith("/s"), message="a rate")
        assert browser.text(f"{row} .eta") != "—"
        assert browser.text(f"{row} .metadata") == "job=progress"
    finally:
        cancel_quietly(server, KEY_A, batch.id)


def test_a_batch_that_failed_validation_shows_its_line_errors(
    server: ServerProcess, browser: Browser
) -> None:
    lines: list[Any] = [
        request_line(CHAT, 0),
        b"{not json",
        request_line(CHAT, 2, custom_id="req-0"),  # a duplicate custom_id
        {**request_line(CHAT, 3), "url": "/v1/embeddings"},
    ]
    batch = create_batch(server, KEY_A, lines)
    assert wait_for(client(server, KEY_A), batch.id).status == "failed"

    browser.sign_in(KEY_A)
    browser.open(f"#/batches/{batch.id}")
    browser.wait(lambda d: browser.present("#validation-errors tr.line-error"), message="line errors")
    rows = browser.driver.find_elements(By.CSS_SELECTOR, "#validation-errors tr.line-error")
    by_line = {row.find_element(By.CSS_SELECTOR, ".line").text: row.text for row in rows}
    assert set(by_line) == {"2", "3", "4"}, by_line
    assert "invalid_json_line" in by_line["2"] or "json" in by_line["2"].lower()
    assert "duplicate" in by_line["3"].lower()
    assert "url" in by_line["4"].lower()
    assert browser.text("#batch-detail .status") == "failed"
    assert [
        li.get_attribute("data-step") for li in browser.driver.find_elements(By.CSS_SELECTOR, ".timeline li")
    ][-1] == "failed"


def test_a_finished_batch_groups_its_failures_and_downloads_its_output(
    server: ServerProcess, browser: Browser
) -> None:
    batch = create_batch(server, KEY_A, chat_lines(8, failing={2, 5}), metadata={"job": "nightly"})
    finished = wait_for(client(server, KEY_A), batch.id)
    assert finished.status == "completed" and finished.request_counts.failed == 2

    browser.sign_in(KEY_A)
    browser.open(f"#/batches/{batch.id}")
    browser.wait(lambda d: browser.present("#error-groups .error-group"), message="the error groups")
    group = browser.driver.find_element(By.CSS_SELECTOR, "#error-groups .error-group")
    assert "2 requests" in group.text and "HTTP 400" in group.text
    examples = [e.text for e in group.find_elements(By.CSS_SELECTOR, ".custom-id")]
    assert examples == ["req-2", "req-5"]
    assert "8 / 8 (2 failed)" in browser.text("#counts")
    assert "nightly" in browser.text("#metadata")
    assert browser.present("#usage") and "Total" in browser.text("#usage")

    expected = client(server, KEY_A).files.content(finished.output_file_id).content
    name = client(server, KEY_A).files.retrieve(finished.output_file_id).filename
    browser.driver.find_element(By.ID, "download-output").click()
    target = browser.downloads / name
    browser.wait(
        lambda d: target.is_file() and target.stat().st_size == len(expected), message="the download"
    )
    assert target.read_bytes() == expected
    assert len(target.read_bytes().splitlines()) == 6


def test_cancelling_through_the_dialog_ends_the_batch_cancelled(
    server: ServerProcess, browser: Browser
) -> None:
    batch = create_batch(server, KEY_A, chat_lines(300))
    try:
        browser.sign_in(KEY_A)
        browser.open(f"#/batches/{batch.id}")
        browser.wait(lambda d: browser.present("#cancel-batch"), message="the cancel button")
        browser.driver.find_element(By.ID, "cancel-batch").click()
        browser.wait(lambda d: d.find_element(By.ID, "cancel-dialog").is_displayed())
        browser.driver.find_element(By.ID, "cancel-keep").click()  # first, changing one's mind
        browser.wait(lambda d: not d.find_element(By.ID, "cancel-dialog").is_displayed())
        assert client(server, KEY_A).batches.retrieve(batch.id).status in ("validating", "in_progress")

        browser.driver.find_element(By.ID, "cancel-batch").click()
        browser.wait(lambda d: d.find_element(By.ID, "cancel-dialog").is_displayed())
        assert batch.id in browser.text("#cancel-text")
        browser.driver.find_element(By.ID, "cancel-confirm").click()
        browser.wait(
            lambda d: browser.text("#batch-detail .status") == "cancelled", message="the batch ends cancelled"
        )
        assert not browser.present("#cancel-batch")
        steps = [
            li.get_attribute("data-step")
            for li in browser.driver.find_elements(By.CSS_SELECTOR, ".timeline li")
        ]
        assert steps[-2:] == ["cancelling", "cancelled"]
    finally:
        cancel_quietly(server, KEY_A, batch.id)


def test_another_key_never_sees_this_projects_batches(server: ServerProcess, browser: Browser) -> None:
    mine = create_batch(server, KEY_A, chat_lines(2), metadata={"owner": "a"})
    theirs = create_batch(server, KEY_B, chat_lines(2), metadata={"owner": "b"})
    for key, batch in ((KEY_A, mine), (KEY_B, theirs)):
        wait_for(client(server, key), batch.id)

    browser.sign_in(KEY_B)
    browser.wait(lambda d: browser.present(f'tr[data-batch-id="{theirs.id}"]'), message="b's own batch")
    shown = {
        row.get_attribute("data-batch-id")
        for row in browser.driver.find_elements(By.CSS_SELECTOR, "#batch-rows tr")
    }
    a_batches = {b.id for b in client(server, KEY_A).batches.list(limit=100).data}
    assert shown and not shown & a_batches
    assert shown == {b.id for b in client(server, KEY_B).batches.list(limit=100).data}

    browser.open(f"#/batches/{mine.id}")  # a direct visit to the other project's batch
    browser.wait(lambda d: browser.present("#not-found"), message="not found")
    assert mine.id in browser.text("#batch-detail")
    assert not browser.present("#batch-detail .status")


def test_server_strings_are_rendered_as_text(server: ServerProcess, browser: Browser) -> None:
    lines = chat_lines(3, failing={1})
    lines[1]["custom_id"] = XSS
    batch = create_batch(server, KEY_A, lines, metadata={"note": XSS})
    wait_for(client(server, KEY_A), batch.id)

    browser.sign_in(KEY_A)
    row = f'tr[data-batch-id="{batch.id}"]'
    browser.wait(lambda d: browser.present(row))
    assert browser.text(f"{row} .metadata") == f"note={XSS}"
    browser.open(f"#/batches/{batch.id}")
    browser.wait(lambda d: browser.present("#error-groups .custom-id"), message="the error examples")
    assert browser.text("#error-groups .custom-id") == XSS
    assert XSS in browser.text("#metadata")
    assert browser.driver.find_elements(By.CSS_SELECTOR, "main img") == []
    assert browser.driver.execute_script("return window.__xss") is None


def test_the_console_answers_with_its_csp(server: ServerProcess) -> None:
    import urllib.request

    for path in ("/console", "/console/app.js", "/console/app.css"):
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as answer:
            assert answer.status == 200
            assert answer.headers["Content-Security-Policy"].startswith(
                "default-src 'none'; script-src 'self'"
            )
            assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_upload_a_file_and_create_a_batch_then_screenshots_of_the_main_pages(
    server: ServerProcess, browser: Browser, tmp_path: Path
) -> None:
    """The upload form creates a batch; then the pages the README shows are photographed, in a project
    of their own: a running batch, a finished one with failures, one that failed validation."""
    finished = create_batch(
        server, KEY_DOCS, chat_lines(12, failing={3, 7, 9}), metadata={"job": "nightly-eval"}
    )
    bad = create_batch(
        server, KEY_DOCS, [request_line(CHAT, 0), b"{not json", {**request_line(CHAT, 2), "method": "GET"}]
    )
    for batch in (finished, bad):
        wait_for(client(server, KEY_DOCS), batch.id)

    path = tmp_path / "questions.jsonl"
    path.write_bytes(jsonl(chat_lines(400, prefix="q")))
    browser.sign_in(KEY_DOCS)
    browser.driver.find_element(By.ID, "nav-new").click()
    browser.wait(lambda d: d.find_element(By.ID, "new-view").is_displayed())
    browser.driver.find_element(By.ID, "new-file").send_keys(str(path))
    browser.wait(lambda d: CHAT in browser.text("#new-endpoint"), message="the endpoint from line 1")
    browser.driver.find_element(By.ID, "new-metadata").send_keys("job=console-upload\nowner=docs")
    browser.screenshot("console-new.png")
    browser.driver.find_element(By.ID, "new-submit").click()
    browser.wait(lambda d: "#/batches/batch_" in d.current_url, message="the new batch's page")
    created_id = browser.driver.current_url.rsplit("/", 1)[-1]
    try:
        created = client(server, KEY_DOCS).batches.retrieve(created_id)
        assert created.endpoint == CHAT and created.completion_window == "24h"
        assert created.metadata == {"job": "console-upload", "owner": "docs"}
        assert client(server, KEY_DOCS).files.content(created.input_file_id).content == path.read_bytes()

        browser.open("#/")
        row = f'tr[data-batch-id="{created_id}"]'
        browser.wait(  # far enough along for the picture, with a rate and an ETA
            lambda d: (
                browser.present(row)
                and progress_value(browser, created_id) >= 25
                and browser.text(f"{row} .rate").endswith("/s")
            ),
            message="a rate",
        )
        browser.screenshot("console-list.png")
    finally:
        cancel_quietly(server, KEY_DOCS, created_id)

    browser.open(f"#/batches/{finished.id}")
    browser.wait(lambda d: browser.present("#error-groups .error-group"))
    browser.screenshot("console-batch.png")
    for name in ("console-new.png", "console-list.png", "console-batch.png"):
        assert (DOCS / name).stat().st_size > 10_000


@contextlib.contextmanager
def console_of(browser: Browser, server: ServerProcess, host: str = "127.0.0.1") -> Iterator[None]:
    """The module's browser pointed at another server's console for a while."""
    before = browser.console_url
    browser.console_url = f"http://{host}:{server.port}/console"
    try:
        yield
    finally:
        browser.console_url = before


def test_downloads_go_through_a_signed_link_whichever_origin_it_is_on(
    browser: Browser, tmp_path: Path
) -> None:
    """The links on http://localhost:PORT. Through that origin the link is the page's own; through
    http://127.0.0.1:PORT it is another origin, as S3 is for the console on AWS: `connect-src 'self'`
    keeps fetch() from following a redirect there, so the page asks for the link and the browser
    downloads from it. Either way the file arrives whole, and the page breaks no policy."""
    process = ServerProcess(
        tmp_path / "data", "--api-key", KEY_A, env={"BATCH_API_MAX_INLINE_DOWNLOAD_BYTES": "0"}
    )
    process.args += ["--public-base-url", f"http://localhost:{process.port}"]
    with process:
        batch = create_batch(process, KEY_A, chat_lines(3))
        finished = wait_for(client(process, KEY_A), batch.id)
        expected = client(process, KEY_A).files.content(finished.output_file_id).content
        name = client(process, KEY_A).files.retrieve(finished.output_file_id).filename

        for host in ("localhost", "127.0.0.1"):
            with console_of(browser, process, host=host):
                browser.sign_in(KEY_A)
                browser.open(f"#/batches/{batch.id}")
                browser.wait(lambda d: browser.present("#download-output"))
                browser.driver.find_element(By.ID, "download-output").click()
                target = browser.downloads / name
                browser.wait(
                    lambda d, target=target: target.is_file() and target.read_bytes() == expected,
                    message=f"the download through {host}",
                )
                target.unlink()
                assert browser.driver.current_url.startswith(f"http://{host}:{process.port}/console")
                refused = [
                    e["message"] for e in browser.browser_log() if "Content Security Policy" in e["message"]
                ]
                assert not refused, refused


def test_the_list_shows_older_batches_a_page_at_a_time(browser: Browser, tmp_path: Path) -> None:
    """101 batches: the 100 newest, then the oldest one too after "Show 100 older"."""
    with ServerProcess(tmp_path / "data", "--api-key", KEY_A) as process:
        sdk = client(process, KEY_A)
        file = sdk.files.create(file=("one.jsonl", io.BytesIO(jsonl(chat_lines(1)))), purpose="batch")
        created = [
            sdk.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h").id
            for _ in range(101)
        ]
        rows = "#batch-rows tr"
        with console_of(browser, process):
            browser.sign_in(KEY_A)
            browser.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, rows)) == 100, message="a page")
            browser.wait(lambda d: d.find_element(By.ID, "list-more").is_displayed())
            assert browser.text("#list-shown") == "Showing the 100 newest batches."
            shown = [
                e.get_attribute("data-batch-id") for e in browser.driver.find_elements(By.CSS_SELECTOR, rows)
            ]
            assert shown == created[::-1][:100]

            browser.driver.find_element(By.ID, "list-older").click()
            browser.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, rows)) == 101, message="the older")
            browser.wait(lambda d: not d.find_element(By.ID, "list-more").is_displayed())
            shown = [
                e.get_attribute("data-batch-id") for e in browser.driver.find_elements(By.CSS_SELECTOR, rows)
            ]
            assert shown == created[::-1]


@pytest.mark.parametrize("backend", ["aws"], indirect=True)
def test_the_console_on_the_aws_adapters(
    start_server: Callable[..., ServerProcess], browser: Browser, backend: str
) -> None:
    """The same pages on DynamoDB, S3 and EventBridge (moto): a finished batch with failures, its groups
    and its output downloaded."""
    process = start_server("--api-key", KEY_A, "--api-key", KEY_B)
    batch = create_batch(process, KEY_A, chat_lines(6, failing={4}), metadata={"backend": backend})
    finished = wait_for(client(process, KEY_A), batch.id)
    expected = client(process, KEY_A).files.content(finished.output_file_id).content
    name = client(process, KEY_A).files.retrieve(finished.output_file_id).filename

    with console_of(browser, process):
        browser.sign_in(KEY_A)
        browser.wait(lambda d: browser.present(f'tr[data-batch-id="{batch.id}"]'))
        browser.open(f"#/batches/{batch.id}")
        browser.wait(lambda d: browser.present("#error-groups .error-group"), message="the error groups")
        assert [
            e.text for e in browser.driver.find_elements(By.CSS_SELECTOR, "#error-groups .custom-id")
        ] == ["req-4"]
        browser.driver.find_element(By.ID, "download-output").click()
        target = browser.downloads / name
        browser.wait(lambda d: target.is_file() and target.read_bytes() == expected, message="the download")
        target.unlink()

        browser.sign_in(KEY_B)
        browser.open(f"#/batches/{batch.id}")
        browser.wait(lambda d: browser.present("#not-found"), message="not found for the other key")


class StagePrefixProxy:
    """API Gateway's stage prefix, played by a small reverse proxy: http://127.0.0.1:PORT/dev/... is
    forwarded to the server as /... (redirects passed back, not followed). Records every path asked."""

    def __init__(self, upstream_port: int, stage: str = "dev") -> None:
        self.stage = stage
        self.paths: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def forward(self) -> None:
                proxy.paths.append(self.path)
                prefix = f"/{proxy.stage}/"
                if not self.path.startswith(prefix):
                    self.send_error(403, "outside the stage")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                connection = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                connection.request(
                    self.command,
                    self.path[len(prefix) - 1 :],
                    self.rfile.read(length) if length else None,
                    headers,
                )
                answer = connection.getresponse()
                body = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                connection.close()

            do_GET = do_POST = do_DELETE = forward

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StagePrefixProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_under_a_stage_prefix_every_request_stays_under_it(server: ServerProcess, browser: Browser) -> None:
    """As on API Gateway (https://.../dev/console, the API at .../dev/v1): the page, its files and every
    API call it makes are relative, so they all go under /dev/."""
    batch = create_batch(server, KEY_B, chat_lines(4, failing={1}))
    finished = wait_for(client(server, KEY_B), batch.id)
    expected = client(server, KEY_B).files.content(finished.output_file_id).content
    name = client(server, KEY_B).files.retrieve(finished.output_file_id).filename

    with StagePrefixProxy(server.port) as proxy:
        before = browser.console_url
        browser.console_url = f"http://127.0.0.1:{proxy.port}/dev/console"
        try:
            browser.sign_in(KEY_B)
            browser.wait(lambda d: browser.present(f'tr[data-batch-id="{batch.id}"]'))
            browser.driver.find_element(By.CSS_SELECTOR, f'tr[data-batch-id="{batch.id}"] a').click()
            browser.wait(lambda d: browser.present("#error-groups .error-group"), message="the batch page")
            browser.driver.find_element(By.ID, "download-output").click()
            target = browser.downloads / name
            browser.wait(
                lambda d: target.is_file() and target.read_bytes() == expected, message="the download"
            )
            target.unlink()
        finally:
            browser.console_url = before

    assert {"/dev/console", "/dev/console/app.js", "/dev/console/app.css"} <= set(proxy.paths)
    assert any(p.startswith("/dev/v1/batches?") for p in proxy.paths)
    assert f"/dev/v1/files/{finished.output_file_id}/link" in proxy.paths
    assert all(p.startswith("/dev/") for p in proxy.paths), proxy.paths
