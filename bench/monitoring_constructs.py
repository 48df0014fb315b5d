"""The stack's hand-written monitoring (`infra/constructs/monitoring.py`) against the same with
cdk-monitoring-constructs' `MonitoringFacade` over the same resources, side by side in one run.

    pip install --no-deps --target /tmp/cmc-lib cdk-monitoring-constructs
    .venv/bin/python bench/monitoring_constructs.py --lib /tmp/cmc-lib   # writes bench/results/...

The library is not a dependency of the project, so it is installed into a directory of its own
and only the child processes of the "facade" variant see it. Each round synthesizes the dev stack
once per variant, in a fresh process (imports included), alternating; medians are reported. The
facade variant keeps our alarms (they are the ones that page) and adds the facade's dashboard for
the state machine, every function and the REST API, which is what the library would bring.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import RESULTS, ROOT, machine

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from aws_cdk.assertions import Template
import infra.stack as stack_module
from infra.app import build_app
if sys.argv[1] == "facade":
    import cdk_monitoring_constructs as cmc

    class WithFacade(stack_module.Monitoring):
        def __init__(self, scope, id, **kw):
            super().__init__(scope, id, **kw)
            facade = cmc.MonitoringFacade(
                self,
                "Facade",
                alarm_factory_defaults=cmc.AlarmFactoryDefaults(
                    alarm_name_prefix="batch-api",
                    actions_enabled=True,
                    action=cmc.SnsAlarmActionStrategy(on_alarm_topic=self.topic),
                ),
            )
            facade.monitor_step_function(state_machine=kw["state_machine"])
            for name, fn in kw["functions"].items():
                facade.monitor_lambda_function(lambda_function=fn, human_readable_name=name)
            facade.monitor_api_gateway(api=kw["rest_api"])

    stack_module.Monitoring = WithFacade
imported = time.perf_counter()
context = json.load(open("cdk.json"))["context"]
context["env"] = "dev"
_app, stack = build_app(context)
template = Template.from_stack(stack).to_json()
done = time.perf_counter()
kinds = [r["Type"] for r in template["Resources"].values()]
print(json.dumps({
    "import": imported - t0,
    "synth": done - imported,
    "bytes": len(json.dumps(template)),
    "resources": len(kinds),
    "alarms": kinds.count("AWS::CloudWatch::Alarm"),
    "dashboards": kinds.count("AWS::CloudWatch::Dashboard"),
}))
"""


def run(variant: str, lib: str) -> dict[str, float]:
    env = dict(os.environ, JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION="20")
    paths = [str(ROOT), *([lib] if variant == "facade" else [])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, variant], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", required=True, help="a directory cdk-monitoring-constructs is installed in")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"hand": [], "facade": []}
    for _ in range(args.rounds):
        for variant in results:
            results[variant].append(run(variant, args.lib))

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results[variant])

    def rounds(variant: str, key: str) -> str:
        return ", ".join(f"{r[key]:.1f}" for r in results[variant])

    rows = []
    for variant, label in (
        ("hand", "hand-written (`infra/constructs/monitoring.py`)"),
        ("facade", "the same + cdk-monitoring-constructs `MonitoringFacade`"),
    ):
        first = results[variant][0]
        rows.append(
            f"| {label} | {median(variant, 'import'):.1f} s ({rounds(variant, 'import')}) "
            f"| {median(variant, 'synth'):.1f} s ({rounds(variant, 'synth')}) "
            f"| {first['bytes'] / 1024:.0f} KiB | {first['resources']:.0f} "
            f"| {first['alarms']:.0f} | {first['dashboards']:.0f} |"
        )
    text = f"""# Monitoring: hand-written against cdk-monitoring-constructs

Machine: {machine()}
Command: `.venv/bin/python bench/monitoring_constructs.py --lib <dir> --rounds {args.rounds}`
Date: {time.strftime("%Y-%m-%d")}

The dev stack synthesized in a fresh process per variant and round (medians; each round in
brackets). Synth includes bundling the Lambda asset, the same for both.

| variant | import | synth | template | resources | alarms | dashboards |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Why the stack keeps its own monitoring: the facade adds no alarm of its own (each is opt-in, one
property per metric, as much code as ours), knows nothing of the EMF metrics that matter here
(requests succeeded/failed, upstream latency: it would need `monitor_custom` for them, the same
widgets written another way) and puts a second, generic dashboard of per-resource graphs next to
ours. It brings a jsii package of about 8 MB and a second version coupling to aws-cdk-lib, and every
synth loads its JavaScript bundle. Our ~150 lines say what pages someone and why.
"""
    (RESULTS / "monitoring_constructs.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
