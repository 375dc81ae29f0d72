"""What a person sees in the Prefect UI, and the server-side watch over runs.

- readable flow-run names: `<deployment>-<data version>-p<params hash>` (`nightly-d3f1a2-p7c9e0`);
- the `run-artifacts` artifact: every stage, its content key, whether it was reused, and its files in S3;
- `install()`: the automations `segpipe stack up` creates. Flow runs send a heartbeat every
  PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds; a run that stops (its worker or machine died) is marked Crashed
  after `HEARTBEAT_MISSES` missed beats instead of staying Running forever, and every Failed or Crashed run
  posts to a webhook (a CustomWebhookNotificationBlock) when one is configured.

`SEGPIPE_ALERT_WEBHOOK=URL python -m flows.monitoring install` does what `segpipe stack up` does. The URL comes
from the environment only, never the command line (a URL may carry a token, and `ps` shows argv to every local
user), and is kept in the block's secret values, so the Prefect UI and API show it as `********`.
"""

from __future__ import annotations

import argparse
import logging
import os
from datetime import timedelta
from pathlib import Path

from prefect.runtime import deployment, flow_run

import pipelines.fetch
from pipelines.contentkey import StageKeys

HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
HEARTBEAT_SECONDS = 30                # Prefect's minimum: a dead worker is noticed within ~2 minutes
HEARTBEAT_MISSES = 3
ZOMBIE_AUTOMATION = "segpipe: crash flow runs that stopped sending heartbeats"
FAILURE_AUTOMATION = "segpipe: notify on failed or crashed flow runs"
WEBHOOK_BLOCK = "segpipe-alerts"
WEBHOOK_ENV = "SEGPIPE_ALERT_WEBHOOK"
# the block's url is this placeholder; the URL itself is one of the block's secrets, filled in when it posts
WEBHOOK_SECRET = "webhook_url"
# library loggers whose records go to the Prefect run log (set in the worker's environment and prefect.yaml)
EXTRA_LOGGERS = "segpipe,pipelines"


def library_logs_at(level: int = logging.INFO) -> None:
    """Prefect gives PREFECT_LOGGING_EXTRA_LOGGERS its API handler but not a level, and they inherit the root's
    WARNING: without this the stages' INFO lines (`skipping TTA <infer.tta=[]>`) never reach the run log."""
    for name in EXTRA_LOGGERS.split(","):
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET or lg.level > level:
            lg.setLevel(level)


library_logs_at()


def _name(version: str, params_hash: str) -> str:
    return f"{deployment.name or 'manual'}-{version[:6]}-p{params_hash[:6]}"


def flow_run_name() -> str:
    """The name a run starts with, from the data version DVC recorded last; `rename_flow_run` corrects it if
    fetching the data finds a newer version."""
    params_file = (flow_run.parameters or {}).get("params_file", "params.yaml")
    try:
        from segpipe.config import DataParams, load_params
        version = pipelines.fetch.data_version(load_params("data", DataParams, Path(params_file)).root)
        phash = StageKeys(params_file).params_hash()
    except Exception:       # a name must never fail a run: the flow's first steps report a bad setup properly
        return f"{deployment.name or 'manual'}-unknown"
    return _name(version, phash)


def rename_flow_run(version: str, params_hash: str) -> str:
    """Set the run's name from the data version `fetch` found; returns it."""
    name = _name(version, params_hash)
    rid = flow_run.get_id()
    if rid and flow_run.get_name() != name:
        from prefect.client.orchestration import get_client
        with get_client(sync_client=True) as client:
            client.update_flow_run(rid, name=name)
    return name


def http_url(store, s3_uri: str) -> str | None:
    """A path-style HTTP address of an s3:// URI on a custom endpoint (opens with the store's credentials)."""
    if not store.cfg.endpoint_url:
        return None
    return f"{store.cfg.endpoint_url.rstrip('/')}/{s3_uri.removeprefix('s3://')}"


def public_score(summary: dict) -> float | str | None:
    """The public mIoU, or where to read it when the leaderboard has no score API ("score on the leaderboard's page")."""
    return summary.get("public_miou") if summary.get("public_miou") is not None else summary.get("submit_score")


def publish_run_links(summary: dict, store) -> None:
    """The `run-artifacts` markdown artifact: where each stage's files are, and whether it ran or was reused."""
    from prefect.artifacts import create_markdown_artifact
    lines = [f"# Run {summary['run']}", "",
             f"data version `{summary['data_version']}`, params `{summary['params_hash']}`, "
             f"{summary['reused']} of {len(summary['stages'])} stages reused from earlier runs", "",
             f"- run folder: `{store.url(summary['artifacts'])}/`",
             f"- summary: `{store.url(summary['artifacts'] + '/summary.json')}`", "",
             "| stage | ran / reused | own work (s) | content key | artifacts |", "| --- | --- | --- | --- | --- |"]
    for r in summary["stages"]:
        link = http_url(store, r["artifacts"])
        where = f"[`{r['artifacts']}/`]({link}/)" if link else f"`{r['artifacts']}/`"
        lines.append(f"| {r['label']} | {'reused' if r['cached'] else 'ran'} | {r['seconds']:.1f} | "
                     f"`{r['key']}` | {where} |")
    if summary.get("submission") is not None or summary.get("submit_status"):
        lines += ["", f"submission: {summary.get('submit_status')} (public mIoU {public_score(summary)}), "
                      f"`{store.url(summary['artifacts'] + '/submit/submission.csv')}`"]
    create_markdown_artifact("\n".join(lines) + "\n", key="run-artifacts",
                             description="every stage's S3 artifacts, content key and whether it was reused")


def check_webhook(url: str) -> None:
    """ValueError unless `url` is an http(s) URL; the message never shows the value (it may carry a token)."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"${WEBHOOK_ENV} is not an http(s) URL: set it to the address to POST alerts to")


def install(webhook: str | None = None, heartbeat_seconds: int = HEARTBEAT_SECONDS) -> dict:
    """Create (or replace) the zombie-run automation and, given a webhook URL, the failure notification."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState, SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    flow_runs = ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]})
    automations = [AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=f"no heartbeat for {HEARTBEAT_MISSES} x {heartbeat_seconds}s: the run's worker is gone",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=flow_runs, for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=HEARTBEAT_MISSES * heartbeat_seconds)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {HEARTBEAT_MISSES * heartbeat_seconds}s: marked "
                                            "Crashed by segpipe's zombie-run automation")])]
    if webhook:
        check_webhook(webhook)
        block = CustomWebhookNotificationBlock(
            name=WEBHOOK_BLOCK, url=f"{{{{ {WEBHOOK_SECRET} }}}}", secrets={WEBHOOK_SECRET: webhook}, method="POST",
            json_data={"subject": "{{subject}}", "body": "{{body}}", "name": "{{name}}"})
        block_id = block.save(WEBHOOK_BLOCK, overwrite=True)
        automations.append(AutomationCore(
            name=FAILURE_AUTOMATION, description=f"posts to the {WEBHOOK_BLOCK} webhook block",
            trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}, match=flow_runs,
                                 posture=Posture.Reactive, threshold=1),
            actions=[SendNotification(
                block_document_id=block_id, subject="segpipe: flow run {{ flow_run.name }} {{ flow_run.state.name }}",
                body="flow run {{ flow_run.name }} ({{ flow_run.id }}) of {{ flow.name }} entered "
                     "{{ flow_run.state.name }}: {{ flow_run.state.message }}")]))
    made = {}
    with get_client(sync_client=True) as client:
        for a in automations:
            for old in client.read_automations_by_name(a.name):
                client.delete_automation(old.id)
            made[a.name] = str(client.create_automation(a))
    return made


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("install", help="create the zombie-run automation and, with $SEGPIPE_ALERT_WEBHOOK (a URL to "
                                       "POST failed/crashed runs to), the failure webhook")
    i.add_argument("--webhook", help=argparse.SUPPRESS)     # gone: only there to say where the URL goes now
    i.add_argument("--heartbeat-seconds", type=int, default=int(os.environ.get(HEARTBEAT_ENV, HEARTBEAT_SECONDS)))
    a = p.parse_args()
    if a.webhook is not None:
        p.error(f"--webhook is gone: a URL on the command line is visible to every local user (`ps`); export "
                f"{WEBHOOK_ENV}=URL instead (and rotate the URL's token if it carries one)")
    webhook = os.environ.get(WEBHOOK_ENV) or None
    if webhook:
        try:
            check_webhook(webhook)
        except ValueError as e:
            p.error(str(e))
    for name, aid in install(webhook, a.heartbeat_seconds).items():
        print(f"automation {aid}: {name}")


if __name__ == "__main__":
    main()
