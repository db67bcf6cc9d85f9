"""The run's summary as Prefect artifacts: counts, failures with reasons, and where the outputs are."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from bridgecore.batch.summary import summarize
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.pipelines import is_scored
from bridgecore.evaluation.capabilities import arm_label
from bridgecore.storage import Storage
from vision_bridge.flows.naming import artifact_key


def report_run(output: str, job: str, pipeline: str, settings: dict, verify: bool = False) -> dict:
    storage = Storage(output)
    summary = summarize(output, job, pipeline, JobSettings.from_dict(settings), verify)
    counts, run = summary["counts"], summary["run"]
    get_run_logger().info("samples: %s (%d shards); summary at %s", counts, summary["shards"],
                          storage.url("runs", run, "summary.json"))
    arm = arm_label(settings, look_up=False) if is_scored(pipeline) else ""
    create_table_artifact([{"state": k, "samples": v} for k, v in counts.items()],
                          key=artifact_key("sample-counts", output, arm),
                          description="Every input sample ends done or failed")
    if summary.get("capabilities"):
        create_table_artifact([{"capability": k, **v} for k, v in summary["capabilities"].items()],
                              key=artifact_key("capability-edit-success", output, arm),
                              description="Benchmark samples: edit success per capability")
    if summary["failures"]:
        create_table_artifact(summary["failures"][:1000], key=artifact_key("failures", output, arm),
                              description="Failed samples and why")
    create_markdown_artifact(
        f"# {pipeline} run {run}\n\n- output: `{storage.root}`\n- summary: `{storage.url('runs', run, 'summary.parquet')}`\n"
        f"- done {counts['done']}, failed {counts['failed']}, pending {counts['pending']}\n",
        key=artifact_key("run-outputs", output, arm))
    return summary
