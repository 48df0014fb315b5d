"""The CDK app: `npx aws-cdk synth -c env=dev|prod` (cdk.json runs `python -m infra.app`).

Run as a module from the repository root, never as `python infra/app.py`: that would put infra/ on
sys.path, and infra/constructs/ would shadow the `constructs` library.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FUNCTIONS_DIR = Path(__file__).resolve().parent.parent / "functions"
if str(FUNCTIONS_DIR) not in sys.path:  # batch_api's schema constants, also without an editable install
    sys.path.append(str(FUNCTIONS_DIR))

from aws_cdk import App, Environment  # noqa: E402

from infra.config import ConfigError, load_env_config  # noqa: E402
from infra.nag import add_nag_checks  # noqa: E402
from infra.stack import BatchApiStack  # noqa: E402


def build_app(context: Mapping[str, Any] | None = None, **app_kwargs: Any) -> tuple[App, BatchApiStack]:
    """The app with one stack for the environment `context["env"]` names (default dev), cdk-nag on.

    `cdk synth` passes cdk.json's context itself; tests pass it explicitly."""
    app = App(context=dict(context) if context is not None else None, **app_kwargs)
    env_name = app.node.try_get_context("env")
    environments = app.node.try_get_context("environments")
    config = load_env_config({"environments": environments}, env_name)
    stack = BatchApiStack(
        app,
        config.stack_name,
        env_config=config,
        env=Environment(account=config.account, region=config.region)
        if config.account or config.region
        else None,
        description=f"batch-api ({config.name}): OpenAI-compatible Batch API",
        tags={"application": "batch-api", "environment": config.name},
    )
    add_nag_checks(app)
    return app, stack


def main() -> None:
    try:
        app, _ = build_app()
    except ConfigError as exc:
        sys.exit(f"batch-api infra: {exc}")
    app.synth()


if __name__ == "__main__":
    main()
