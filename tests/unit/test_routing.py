"""Upstreams by model: the TOML file, routing, and the checks made at start."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batch_api.config import Settings, redact_url
from batch_api.upstreams import OpenAIHttpUpstream, make_upstream_factory, openai_http
from batch_api.upstreams.capacity import GateStats
from batch_api.upstreams.gated import GatedUpstream
from batch_api.upstreams.openai_http import RESERVED_FILE_DESCRIPTORS, check_base_url, connection_budget
from batch_api.upstreams.routing import DISCOVERY_MAX_AGE_SECONDS, UpstreamPool, load_specs
from tests.support.fake_upstream import FakeUpstreamServer, free_port

pytestmark = pytest.mark.unit

FUNCTIONS = Path(__file__).resolve().parents[2] / "functions"

FILE = """
[[upstreams]]
name = "llama"
base_url = "http://gpu-a:8000/v1"
api_key_env = "LLAMA_KEY"
models = ["llama-3.1-8b", "llama-3.1-70b"]
max_in_flight = 16

[[upstreams]]
name = "catch-all"
kind = "mock"
max_in_flight = 4
"""


def pool_from(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> UpstreamPool:
    path = tmp_path / "upstreams.toml"
    path.write_text(text)
    settings = Settings(upstreams_file=path)
    return UpstreamPool(
        load_specs(settings), settings, environ if environ is not None else {"LLAMA_KEY": "k"}
    )


def test_a_batch_goes_to_the_upstream_that_lists_its_model_else_to_one_that_serves_any(
    tmp_path: Path,
) -> None:
    pool = pool_from(tmp_path, FILE)
    assert pool.route("llama-3.1-70b").name == "llama"  # type: ignore[union-attr]
    assert pool.route("gpt-4o-mini").name == "catch-all"  # type: ignore[union-attr]
    client = pool(model="llama-3.1-8b", batch_id="batch_1")
    assert isinstance(client, OpenAIHttpUpstream)
    assert client._gate is pool.gates["llama"] and client._batch_id == "batch_1"
    assert client._headers["Authorization"] == "Bearer k"
    other = pool(model="anything", batch_id="batch_2")
    assert isinstance(other, GatedUpstream) and other.gate is pool.gates["catch-all"]
    assert pool.gates["llama"].max_in_flight == 16 and pool.gates["catch-all"].max_in_flight == 4


def test_without_a_catch_all_an_unlisted_model_is_not_served(tmp_path: Path) -> None:
    pool = pool_from(tmp_path, FILE.split('[[upstreams]]\nname = "catch-all"')[0])
    assert pool.serves("llama-3.1-8b")
    assert not pool.serves("gpt-4o-mini")
    with pytest.raises(LookupError, match="gpt-4o-mini"):
        pool(model="gpt-4o-mini", batch_id="b")


def test_the_settings_single_upstream_serves_every_model() -> None:
    pool = make_upstream_factory(Settings(upstream_url="http://model:8001/v1", upstream_max_in_flight=7))
    assert [spec.name for spec in pool.specs] == ["default"]
    assert pool.serves("whatever-model")
    assert pool.gates["default"].max_in_flight == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[upstreams]]\nname = 'a'\n", "needs a base_url"),
        ("[[upstreams]]\nname = 'a'\nkind = 'mock'\n[[upstreams]]\nname = 'a'\nkind = 'mock'\n", "unique: a"),
        ("[[upstreams]]\nname = 'a'\nbase_url = 'ftp://x'\n", "http\\(s\\) URL"),
        ("[[upstreams]]\nname = 'a'\nkind = 'mock'\nmax_in_flight = 0\n", "max_in_flight"),
        ("[[upstreams]]\nname = 'a'\nkind = 'mock'\ncolour = 'red'\n", "colour"),
        ("upstreams = []\n", "upstreams"),
        ("[[upstreams]\n", "cannot read"),
        (
            "[[upstreams]]\nname = 'a'\nkind = 'mock'\napi_key = 'x'\napi_key_env = 'Y'\n",
            "only one of api_key, api_key_env",
        ),
        (
            "[[upstreams]]\nname = 'a'\nkind = 'mock'\napi_key_env = 'Y'\napi_key_secret = 's'\n",
            "only one of api_key_env, api_key_secret",
        ),
        ("[[upstreams]]\nname = 'a b'\nkind = 'mock'\n", "upstreams.0.name"),
    ],
)
def test_a_bad_file_fails_at_start_naming_the_file_and_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        make_upstream_factory(Settings(upstreams_file=path))
    assert str(path) in str(caught.value)


def test_a_missing_file_and_a_missing_key_variable_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the upstreams file"):
        make_upstream_factory(Settings(upstreams_file=tmp_path / "absent.toml"))
    with pytest.raises(ValueError, match="LLAMA_KEY is not set"):
        pool_from(tmp_path, FILE, environ={})


def test_descriptions_never_show_credentials(tmp_path: Path) -> None:
    pool = pool_from(
        tmp_path,
        FILE.replace("http://gpu-a:8000/v1", "http://u:secret@gpu-a:8000/v1").replace(
            'api_key_env = "LLAMA_KEY"\n', ""
        ),
    )
    text = " ".join(spec.describe() for spec in pool.specs)
    assert "secret" not in text and "***@gpu-a:8000" in text
    assert "any model" in text and "llama-3.1-8b, llama-3.1-70b" in text


@pytest.mark.parametrize(
    "key_line",
    ['api_key = "sk-file"', 'api_key_env = "LLAMA_KEY"', 'api_key_secret = "batch-api/llama"'],
)
def test_credentials_in_a_base_url_and_a_key_are_refused_at_start(tmp_path: Path, key_line: str) -> None:
    text = FILE.replace("http://gpu-a:8000/v1", "http://bob:pw-secret@gpu-a:8000/v1").replace(
        'api_key_env = "LLAMA_KEY"', key_line
    )
    with pytest.raises(ValueError, match=r"carries credentials and .* gives a key too; give one") as caught:
        pool_from(tmp_path, text)
    assert "pw-secret" not in str(caught.value)
    # the same list as the stack passes it (BATCH_API_UPSTREAMS_JSON) is refused the same way
    specs = '[{"name": "x", "base_url": "http://bob:pw-secret@h/v1", "api_key_secret": "s"}]'
    with pytest.raises(ValueError, match="give one") as caught:
        load_specs(Settings(upstreams_json=specs))
    assert "pw-secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://u:secret@host:8000/v1", "http://***@host:8000/v1"),
        ("u:secret@host:8000/v1", "***@host:8000/v1"),  # no scheme: "u" reads as one
        ("http://host:8000/v1", "http://host:8000/v1"),
        ("host/v1", "host/v1"),
        (None, None),
    ],
)
def test_redacted_urls_never_show_what_comes_before_an_at(url: str | None, shown: str | None) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", ["http://host:99999/v1", "http://host:port/v1", "http://:8000/v1"])
def test_a_base_url_with_a_bad_port_or_no_host_is_refused_at_start(url: str) -> None:
    with pytest.raises(ValueError, match="upstream base URL"):
        check_base_url(url)
    with pytest.raises(ValueError, match="upstream base URL"):
        make_upstream_factory(Settings(upstream="http", upstream_url=url))


def test_the_load_report_names_each_busy_upstream_once_per_change(tmp_path: Path) -> None:
    pool = pool_from(tmp_path, FILE)
    seen: dict[str, GateStats] = {}
    assert pool.load_report(seen) == []  # nothing happened yet
    gate = pool.gates["llama"]
    gate.in_flight, gate.admitted, gate.throttled = 3, 10, 2
    gate.answered, gate.answer_seconds = 4, 1.0
    [line] = pool.load_report(seen)
    assert line == (
        f"upstream llama: 3 in flight, limit {gate.limit:.1f} of 16, 0 waiting in 0 batch(es), "
        "mean latency 250 ms over 4 answer(s) since the last report, "
        "10 attempts and 2 answered 429/503 since start"
    )
    assert pool.load_report(seen) == []  # unchanged since the last report
    gate.admitted, gate.answered, gate.answer_seconds = 11, 6, 1.6  # 2 more answers, 0.6 s between them
    [line] = pool.load_report(seen)
    assert "mean latency 300 ms over 2 answer(s) since the last report" in line
    gate.admitted = 12  # admitted, not answered yet
    [line] = pool.load_report(seen)
    assert "no answer since the last report" in line


# ---------------------------------------------------------------- models discovered from the upstream


def discovering(tmp_path: Path, base_url: str) -> UpstreamPool:
    return pool_from(
        tmp_path, f'[[upstreams]]\nname = "vllm"\nbase_url = "{base_url}"\nmodels = "discover"\n', environ={}
    )


def test_discovered_models_route_and_are_refreshed_when_stale(tmp_path: Path) -> None:
    with FakeUpstreamServer() as server:
        pool = discovering(tmp_path, server.base_url)
        assert pool.serves("mock-chat")  # what its GET /v1/models lists
        assert not pool.serves("gpt-4o-mini")
        assert "models discovered from it" in pool.specs[0].describe()
        now = [1_000_000.0]
        pool.clock = lambda: now[0]
        pool._discovered["vllm"] = (now[0], ["old-model"])
        assert pool.serves("old-model")  # fresh enough: no request
        now[0] += DISCOVERY_MAX_AGE_SECONDS + 1
        assert pool.serves("mock-chat") and not pool.serves("old-model")  # stale: asked again


def test_a_failed_listing_keeps_what_was_known_and_an_unknown_upstream_serves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with caplog.at_level(logging.WARNING):
        pool = discovering(tmp_path, dead)
    assert not pool.serves("mock-chat")
    assert "serves no model until it answers" in caplog.text
    now = [2_000_000.0]
    pool.clock = lambda: now[0]
    pool._discovered["vllm"] = (now[0] - DISCOVERY_MAX_AGE_SECONDS - 1, ["known-model"])
    assert pool.serves("known-model")  # the refresh failed: the last list stands
    stamp, _models = pool._discovered["vllm"]
    assert now[0] - DISCOVERY_MAX_AGE_SECONDS < stamp < now[0]  # retried sooner than a full age


def test_the_mock_asked_to_discover_serves_any_model(tmp_path: Path) -> None:
    pool = pool_from(tmp_path, '[[upstreams]]\nname = "m"\nkind = "mock"\nmodels = "discover"\n')
    assert pool.serves("anything")


def test_on_aws_models_are_discovered_at_first_use_with_the_key_from_its_secret() -> None:
    """A Lambda builds its pool without a network call or a secret read (the API function has
    neither the grant nor the need); the first routing lists the models, keyed from the secret."""
    read: list[str] = []

    def secrets(name: str) -> str:
        read.append(name)
        return "sk-from-secret"

    with FakeUpstreamServer() as server:
        upstreams = (
            f'[{{"name":"vllm","base_url":"{server.base_url}","api_key_secret":"s/v","models":"discover"}}]'
        )
        pool = make_upstream_factory(Settings(upstreams_json=upstreams), secrets=secrets, discover_now=False)
        assert read == [] and server.model_listings == []
        assert pool.serves("mock-chat")
        assert read == ["s/v"]
        assert server.model_listings == ["Bearer sk-from-secret"]


def test_an_unreadable_secret_leaves_a_discovering_upstream_serving_nothing_for_now(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def secrets(name: str) -> str:
        raise RuntimeError(f"AccessDenied on {name}")

    upstreams = (
        '[{"name":"vllm","base_url":"http://127.0.0.1:9/v1","api_key_secret":"s/v","models":"discover"}]'
    )
    pool = make_upstream_factory(Settings(upstreams_json=upstreams), secrets=secrets, discover_now=False)
    with caplog.at_level(logging.WARNING):
        assert not pool.serves("mock-chat")
    assert "AccessDenied on s/v" in caplog.text


def test_upstreams_come_from_a_file_or_json_not_both(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text('[[upstreams]]\nname = "m"\nkind = "mock"\n')
    with pytest.raises(ValueError, match="not both"):
        load_specs(Settings(upstreams_file=path, upstreams_json='[{"name":"m","kind":"mock"}]'))
    with pytest.raises(ValueError, match="BATCH_API_UPSTREAMS_JSON is not valid JSON"):
        load_specs(Settings(upstreams_json="[{"))
    with pytest.raises(ValueError, match=r"BATCH_API_UPSTREAMS_JSON is not valid: upstreams\.0\.base_url"):
        load_specs(Settings(upstreams_json='[{"name":"h","base_url":7}]'))


# ---------------------------------------------------------------- open files


def test_the_connection_budget_is_the_open_file_limit_less_the_reserve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert connection_budget(1024) == 1024 - RESERVED_FILE_DESCRIPTORS == 896
    assert connection_budget(RESERVED_FILE_DESCRIPTORS) == 1  # never none at all
    monkeypatch.setattr(openai_http.resource, "getrlimit", lambda _which: (300, 4096))
    assert connection_budget() == 300 - RESERVED_FILE_DESCRIPTORS  # the soft limit is the one enforced
    unlimited = openai_http.resource.RLIM_INFINITY
    monkeypatch.setattr(openai_http.resource, "getrlimit", lambda _which: (unlimited, unlimited))
    assert connection_budget() > 1_000_000


def test_an_upstream_is_held_to_the_connections_the_process_can_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(openai_http.resource, "getrlimit", lambda _which: (200, 200))  # budget 72
    text = (
        FILE.replace("max_in_flight = 4", "max_in_flight = 500")
        + '[[upstreams]]\nname = "big"\nbase_url = "http://b/v1"\nmodels = ["big-model"]\nmax_in_flight = 1000\n'
    )
    with caplog.at_level(logging.WARNING, logger="batch_api.upstreams.routing"):
        pool = pool_from(tmp_path, text)
    assert {name: gate.max_in_flight for name, gate in pool.gates.items()} == {
        "llama": 16,  # within the budget: as configured
        "big": 72,
        "catch-all": 500,  # the in-process mock opens no connections
    }
    client = pool(model="big-model", batch_id="b")
    assert isinstance(client, OpenAIHttpUpstream) and client.max_connections == 72
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "upstream big: max_in_flight 1000" in warnings[0] and "72" in warnings[0]


OPEN_FILES_SCRIPT = r"""
import asyncio, json, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from batch_api.config import Settings
from batch_api.upstreams import make_upstream_factory

requests = int(sys.argv[3])
pool = make_upstream_factory(
    Settings(upstream_url=sys.argv[1], upstream_max_in_flight=requests, upstream_max_retries=0)
)
gate = pool.gates["default"]
gate.limit = float(gate.max_in_flight)  # past slow start: every slot usable at once

async def main():
    client = pool(model="m", batch_id="b")
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"user":"delay=0.2"}'
    answers = await asyncio.gather(*(client.send("/v1/chat/completions", body) for _ in range(requests)))
    await client.aclose()
    print(json.dumps([a.status_code or a.error_message for a in answers]))

asyncio.run(main())
"""


def test_more_in_flight_than_open_files_allow_waits_for_connections_instead_of_failing() -> None:
    """A process allowed 256 open files sends 300 requests at once to an upstream whose limit is 300:
    every one is answered (at most 128 connections at a time), none fails for want of a descriptor."""
    with FakeUpstreamServer() as upstream:
        done = subprocess.run(
            [sys.executable, "-c", OPEN_FILES_SCRIPT, upstream.base_url, "256", "300"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(FUNCTIONS)},
        )
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    assert len(answers) == 300
    assert [a for a in answers if a != 200] == []
