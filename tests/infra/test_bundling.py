"""The Lambda code asset holds the modules the handlers import, and only those (infra/bundling.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from infra.bundling import (
    DATA_DIRS,
    FUNCTIONS_DIR,
    HANDLER_MODULES,
    copy_data,
    copy_imported,
    imported_modules,
)
from infra.constructs.api import API_HANDLER
from infra.constructs.housekeeping import HANDLER as HOUSEKEEPING_HANDLER
from infra.constructs.webhooks import HANDLER as WEBHOOKS_HANDLER
from infra.constructs.workflow import HANDLERS as WORKFLOW_HANDLERS

pytestmark = pytest.mark.infra

LOCAL_ONLY = (
    "batch_api.local.server",
    "batch_api.local.cli",
    "batch_api.local.bootstrap",
    "batch_api.adapters.local.sqlite",
    "batch_api.adapters.local.filesystem",
    "batch_api.adapters.local.webhook_outbox",
    "batch_api.webhooks.outbox",  # the local deliverer (the AWS delivery imports only its Post type)
    "batch_api.adapters.memory",
    "batch_api.upstreams.mock_server",
    "batch_api.client.commands",  # the client commands and their openai SDK
    "batch_api.client.display",
)


def test_the_handler_modules_are_those_the_functions_name() -> None:
    named = {
        API_HANDLER.rpartition(".")[0],
        HOUSEKEEPING_HANDLER.rpartition(".")[0],
        WEBHOOKS_HANDLER.rpartition(".")[0],
        WORKFLOW_HANDLERS,
    }
    assert named == set(HANDLER_MODULES)


def test_what_the_handlers_import_is_in_and_the_local_server_is_out() -> None:
    modules = imported_modules()
    assert set(HANDLER_MODULES) <= modules
    # reached only through imports inside functions (the steps a handler runs) or relative imports
    assert {"batch_api.workflow.finalize", "batch_api.adapters.aws.leases", "batch_api.upstreams"} <= modules
    assert {"batch_api", "batch_api.adapters", "batch_api.adapters.aws"} <= modules  # packages on the way
    for module in LOCAL_ONLY:
        assert (FUNCTIONS_DIR / (module.replace(".", "/") + ".py")).is_file(), module  # it exists...
        assert module not in modules  # ...and stays out


def test_relative_imports_and_imports_inside_functions_are_followed(tmp_path: Path) -> None:
    package = tmp_path / "batch_api"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "root.py").write_text("from .sub import helper\n\ndef later():\n    import batch_api.late\n")
    (package / "sub" / "__init__.py").write_text("from . import deep\n")
    (package / "sub" / "helper.py").write_text("from ..shared import VALUE\n")
    (package / "sub" / "deep.py").write_text("")
    (package / "shared.py").write_text("VALUE = 1\n")
    (package / "late.py").write_text("")
    (package / "unused.py").write_text("")

    found = imported_modules(("batch_api.root",), tmp_path)

    assert found == {
        "batch_api",
        "batch_api.root",
        "batch_api.sub",
        "batch_api.sub.helper",
        "batch_api.sub.deep",
        "batch_api.shared",
        "batch_api.late",
    }


def test_every_module_of_the_asset_imports_from_the_asset_alone(tmp_path: Path) -> None:
    copied = copy_imported(tmp_path)
    assert len(copied) == len(imported_modules())
    env = {
        **os.environ,
        "BATCH_API_BACKEND": "aws",
        "BATCH_API_TABLE_NAME": "t",
        "BATCH_API_BUCKET_NAME": "b",
        "BATCH_API_EVENT_BUS_NAME": "e",
        "BATCH_API_STATE_MACHINE_ARN": "arn:aws:states:us-east-1:123456789012:stateMachine:x",
        "BATCH_API_API_KEYS": '["sk-asset-check"]',
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    script = (
        "import importlib, pathlib, sys\n"
        f"root = pathlib.Path({str(tmp_path)!r}); sys.path.insert(0, str(root))\n"
        "names = ['.'.join(p.relative_to(root).with_suffix('').parts).removesuffix('.__init__')"
        " for p in root.rglob('*.py')]\n"
        "for name in sorted(names): importlib.import_module(name)\n"
        "elsewhere = [k for k, m in sys.modules.items() if k.startswith('batch_api')"
        " and not m.__file__.startswith(str(root))]\n"
        "assert not elsewhere, elsewhere\n"
        "print(len(names))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) == len(copied)


def test_the_console_files_ship_with_the_module_that_serves_them(tmp_path: Path) -> None:
    """The web console's static files are data, not imports: copied with `handlers.console`, and the
    API handler built from the asset alone answers them."""
    from batch_api.handlers.console import ASSETS, ASSETS_DIR

    assert "batch_api.handlers.console" in imported_modules()
    assert set(DATA_DIRS) <= imported_modules()
    copy_imported(tmp_path)
    copied = copy_data(tmp_path)
    names = {name for name, _type in ASSETS.values()}
    assert {p.as_posix() for p in copied} >= {f"batch_api/console/{name}" for name in names}
    for name in names:
        assert (tmp_path / "batch_api" / "console" / name).read_bytes() == (ASSETS_DIR / name).read_bytes()

    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from batch_api.handlers import console\n"
        "assert console.ASSETS_DIR.is_relative_to(sys.argv[1]), console.ASSETS_DIR\n"
        "from batch_api.handlers.lambda_api import app, handle\n"
        "for path in console.ASSETS:\n"
        "    event = {'resource': '/{proxy+}', 'path': path, 'httpMethod': 'GET', 'headers': {},\n"
        "             'requestContext': {'requestId': 'r', 'stage': 'dev', 'path': '/dev' + path}}\n"
        "    answer = handle(app, event, None)\n"
        "    assert answer['statusCode'] == 200, (path, answer)\n"
        "    assert answer['body'] == console.asset_text(console.ASSETS[path][0])\n"
        "print('ok')\n"
    )
    env = {
        **os.environ,
        "BATCH_API_BACKEND": "aws",
        "BATCH_API_TABLE_NAME": "t",
        "BATCH_API_BUCKET_NAME": "b",
        "BATCH_API_EVENT_BUS_NAME": "e",
        "BATCH_API_STATE_MACHINE_ARN": "arn:aws:states:us-east-1:123456789012:stateMachine:x",
        "BATCH_API_API_KEYS": '["sk-asset-check"]',
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
