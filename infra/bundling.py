"""The one Lambda code asset for every function, built without Docker.

`pip install --platform manylinux..._<arch> --only-binary=:all:` fetches wheels for the Lambda
architecture and Python version (not for this machine), then the modules of the `batch_api` package
that the functions' handlers import (directly or through each other, at any depth) are copied next to
them, with the data files those modules read (the web console's static files): the local server, its SQLite and filesystem adapters and the in-memory fakes stay out. The AWS SDK is left to the Lambda runtime: it is removed again when a dependency (the X-Ray
SDK) drags botocore in, because a bundled botocore would shadow the runtime's and skew against its
boto3.
"""

from __future__ import annotations

import ast
import hashlib
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsii
from aws_cdk import AssetHashType, BundlingOptions, ILocalBundling
from aws_cdk import aws_lambda as lambda_

REPO_ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS_DIR = REPO_ROOT / "functions"
PACKAGE_NAME = "batch_api"

# provided by every Lambda Python runtime; never bundled (see the module docstring)
RUNTIME_PROVIDED = frozenset(
    {"boto3", "botocore", "s3transfer", "jmespath", "urllib3", "python-dateutil", "six"}
)
# the local HTTP server's; no Lambda function runs it
LOCAL_ONLY = frozenset({"uvicorn", "h11"})
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
# the modules the functions' handler strings name (infra/constructs: api, workflow, housekeeping, webhooks)
HANDLER_MODULES = (
    "batch_api.handlers.lambda_api",
    "batch_api.handlers.workflow",
    "batch_api.handlers.webhooks",
)
# files a module reads at run time (not imports: the import closure cannot find them), copied into the
# asset with that module: module -> directory under functions/
DATA_DIRS = {"batch_api.handlers.console": "batch_api/console"}  # the web console's static files


def _module_file(package_root: Path, module: str) -> Path | None:
    base = package_root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(
    roots: tuple[str, ...] = HANDLER_MODULES, package_root: Path = FUNCTIONS_DIR
) -> set[str]:
    """The package's modules `roots` import, at any depth and wherever the import statement is (inside
    functions too), with every package `__init__` on their way: what the functions can ever run."""
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        module = pending.pop()
        if module in seen or not module.startswith(PACKAGE_NAME):
            continue
        path = _module_file(package_root, module)
        if path is None:  # a name imported from a module, not a module of its own
            continue
        seen.add(module)
        parts = module.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages on its way
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = parts if is_package else parts[:-1]
                    base = ".".join(
                        anchor[: len(anchor) - node.level + 1] + ([node.module] if node.module else [])
                    )
                else:
                    base = node.module or ""
                pending.append(base)
                pending += [f"{base}.{alias.name}" for alias in node.names]
    return seen


def copy_imported(out: Path, package_root: Path = FUNCTIONS_DIR) -> list[Path]:
    """Copy the modules `imported_modules` finds into `out`; returns the files copied (relative)."""
    copied = []
    for module in sorted(imported_modules(package_root=package_root)):
        source = _module_file(package_root, module)
        assert source is not None
        relative = source.relative_to(package_root)
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, out / relative)
        copied.append(relative)
    return copied


def copy_data(out: Path, package_root: Path = FUNCTIONS_DIR) -> list[Path]:
    """Copy the `DATA_DIRS` of the modules in the asset into `out`; returns the files copied (relative)."""
    copied = []
    modules = imported_modules(package_root=package_root)
    for module, directory in sorted(DATA_DIRS.items()):
        if module not in modules:
            continue
        for source in sorted((package_root / directory).rglob("*")):
            if source.is_file() and "__pycache__" not in source.parts:
                relative = source.relative_to(package_root)
                (out / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, out / relative)
                copied.append(relative)
    return copied


def runtime_requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """The package's runtime dependencies from pyproject.toml, with the Powertools tracer extra and
    without those only the local server uses."""
    deps: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [
        d.replace("aws-lambda-powertools", "aws-lambda-powertools[tracer]", 1)
        if d.startswith("aws-lambda-powertools") and "[" not in d
        else d
        for d in deps
        if _normalise(re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0]) not in LOCAL_ONLY
    ]


def pip_platforms(architecture: lambda_.Architecture) -> list[str]:
    arch = "aarch64" if architecture.name == lambda_.Architecture.ARM_64.name else "x86_64"
    # Lambda's python3.12+ runtimes run on Amazon Linux 2023 (glibc 2.34)
    return [f"manylinux_2_28_{arch}", f"manylinux2014_{arch}"]


def python_version(runtime: lambda_.Runtime) -> str:
    return runtime.name.removeprefix("python")  # "python3.14" -> "3.14"


@jsii.implements(ILocalBundling)
class PipLocalBundling:
    """Builds the asset on this machine; the Docker image in `BundlingOptions` is never used."""

    def __init__(self, *, runtime: lambda_.Runtime, architecture: lambda_.Architecture) -> None:
        self.runtime = runtime
        self.architecture = architecture

    def try_bundle(self, output_dir: str, options: Any = None, **_: Any) -> bool:
        out = Path(output_dir)
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
        ]
        for platform in pip_platforms(self.architecture):
            command += ["--platform", platform]
        command += [
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            python_version(self.runtime),
            "--target",
            str(out),
            *runtime_requirements(),
        ]
        subprocess.run(command, check=True)
        remove_distributions(out, RUNTIME_PROVIDED)
        shutil.rmtree(out / "bin", ignore_errors=True)  # console scripts pointing at this machine's python
        copy_imported(out)
        copy_data(out)
        return True


def remove_distributions(target: Path, names: frozenset[str]) -> None:
    """Uninstall `names` from a `pip --target` directory, file by file from each RECORD."""
    wanted = {_normalise(n) for n in names}
    for info in target.glob("*.dist-info"):
        if _normalise(info.name.split("-")[0]) not in wanted:
            continue
        for line in (info / "RECORD").read_text().splitlines():
            path = target / line.split(",")[0]
            if path.is_file():
                path.unlink()
        shutil.rmtree(info, ignore_errors=True)
    for directory in sorted(target.iterdir()):  # package directories left empty
        if directory.is_dir() and not any(p.is_file() for p in directory.rglob("*")):
            shutil.rmtree(directory)


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def source_hash(runtime: lambda_.Runtime, architecture: lambda_.Architecture) -> str:
    """Changes whenever the code, the dependency list or the target platform changes."""
    digest = hashlib.sha256()
    digest.update(
        f"{python_version(runtime)} {pip_platforms(architecture)} {runtime_requirements()}".encode()
    )
    package = FUNCTIONS_DIR / PACKAGE_NAME
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(path.relative_to(package).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def function_code(runtime: lambda_.Runtime, architecture: lambda_.Architecture) -> lambda_.Code:
    """One code asset for all functions. With bundling skipped (`aws:cdk:bundling-stacks` = [],
    as the tests do) the asset is the unbundled functions directory."""
    return lambda_.Code.from_asset(
        str(FUNCTIONS_DIR),
        exclude=["**/__pycache__", "**/*.pyc", "*.egg-info"],
        asset_hash_type=AssetHashType.CUSTOM,
        asset_hash=source_hash(runtime, architecture),
        bundling=BundlingOptions(
            image=runtime.bundling_image,  # required by the API; never used: local bundling succeeds
            local=PipLocalBundling(runtime=runtime, architecture=architecture),
        ),
    )
