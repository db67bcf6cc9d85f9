"""Scale-out on Prefect itself: batches of shards go to `process-shards` runs on a work pool.

Children are submitted without waiting (`timeout=0`) and polled. Anything not Completed is resubmitted:
Crashed, Failed, or Running without committing a single stage of a shard for `stuck_s` (its worker died
and Prefect has not noticed yet). Children are idempotent, so a resubmitted batch only finishes what its
predecessor left.
"""

from __future__ import annotations

import time

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

FINAL_BAD = {"CRASHED", "FAILED", "CANCELLED"}
STALL_SECONDS = 900.0  # a running child that commits nothing for this long has lost its worker: resubmitted


class StallWatch:
    """When a running child has committed nothing for `stuck_s`: its worker is gone (a lost machine leaves its run
    RUNNING). The clock starts when the child is first seen RUNNING (a child queued behind others for a free slot is
    not stalled), with the count of committed (stage, shard) pairs at that moment, so the first look after `stuck_s`
    already decides (it used to start from -1: any count looked like progress and the first check only reset the
    timer, so a lost node was noticed after twice `stuck_s`)."""

    def __init__(self, stuck_s: float):
        self.stuck_s = stuck_s
        self.seen: dict[int, tuple[int, float]] = {}  # batch -> (committed count, when it last grew)

    def start(self, index: int, count: int, now: float) -> None:
        self.seen[index] = (count, now)

    def forget(self, index: int) -> None:
        """A resubmitted batch: its new child starts its own clock when it runs."""
        self.seen.pop(index, None)

    def running(self, index: int, now: float, count_now) -> bool:
        """Called at every look at a RUNNING child: starts its clock the first time; True when it is stalled."""
        if index not in self.seen:
            self.start(index, count_now(), now)
            return False
        return self.stalled(index, now, count_now)

    def stalled(self, index: int, now: float, count_now) -> bool:
        """`count_now()` is called only once `stuck_s` passed since the last growth (it reads storage)."""
        count, since = self.seen[index]
        if now - since < self.stuck_s:
            return False
        current = count_now()
        if current > count:
            self.seen[index] = (current, now)
            return False
        return True

    def stalled_since(self, index: int) -> float:
        return self.seen[index][1]


def run_on_workers(deployment: str, batches: list[list[str]], parameters: dict, deadline_s: float = 3600,
                   poll_s: float = 1.0, stuck_s: float = STALL_SECONDS, max_submissions: int = 3,
                   progress_every_s: float = 10.0) -> list[str]:
    """Runs every batch to completion on the pool behind `deployment`; returns the child run ids. Children carry
    the job's tags; the job's progress (from the markers) is a Prefect progress artifact and a log line."""
    from bridgecore.batch.job_plan import committed_stages
    from bridgecore.batch.progress import JobProgress
    from bridgecore.batch.settings import JobSettings
    from vision_bridge.flows.naming import artifact_key, job_tags

    logger = get_run_logger()
    start = time.monotonic()
    submitted: dict[int, tuple[str, float, int]] = {}  # batch index -> (run id, submitted at, submissions)
    settings = JobSettings.from_dict(parameters["settings"])
    watch = StallWatch(stuck_s)

    def committed(index: int) -> int:
        return committed_stages(parameters["output"], parameters["pipeline"], settings, batches[index])

    tags = job_tags(parameters["pipeline"], parameters["output"], parameters["settings"])

    def submit(index: int, count: int):
        watch.forget(index)
        run = run_deployment(deployment, parameters={**parameters, "shard_ids": batches[index]}, timeout=0,
                             as_subflow=True, tags=tags)
        submitted[index] = (str(run.id), time.monotonic(), count)
        logger.info("batch %d (%d shards) -> run %s", index, len(batches[index]), run.id)

    for index in range(len(batches)):
        submit(index, 1)
    done: set[int] = set()
    # live progress from the markers: per stage samples done/failed, samples/s, ETA (artifact + a log line)
    job = JobProgress(parameters["output"], parameters["pipeline"], settings,
                      [shard for batch in batches for shard in batch]).look()
    progress = create_progress_artifact(100 * job.fraction, description=job.line(),
                                        key=artifact_key("progress", parameters["output"], " ".join(tags)))
    looked = logged = time.monotonic()

    def refresh() -> None:
        try:  # progress is for people: a storage hiccup here must not stop the dispatch
            update_progress_artifact(progress, 100 * job.look().fraction, job.line())
        except Exception as error:  # noqa: BLE001
            logger.warning("progress not updated: %s: %s", type(error).__name__, error)

    with get_client(sync_client=True) as client:
        while len(done) < len(batches):
            if time.monotonic() - start > deadline_s:
                raise TimeoutError(f"{len(batches) - len(done)} shard batches unfinished after {deadline_s}s")
            time.sleep(poll_s)
            if time.monotonic() - looked >= progress_every_s:
                looked = time.monotonic()
                refresh()
                if looked - logged >= 6 * progress_every_s:
                    logged = looked
                    logger.info("progress: %s", job.line())
            for index, (run_id, since, count) in list(submitted.items()):
                if index in done:
                    continue
                state = client.read_flow_run(run_id).state
                kind = state.type.value if state else "PENDING"
                if kind == "COMPLETED":
                    done.add(index)
                    refresh()
                    logger.info("batch %d finished: %s", index, job.line())
                elif kind in FINAL_BAD or (kind == "RUNNING" and watch.running(index, time.monotonic(),
                                                                                 lambda i=index: committed(i))):
                    if count >= max_submissions:
                        raise RuntimeError(f"batch {index} ended {kind} {count} times; last run {run_id}")
                    logger.warning("batch %d run %s ended %s: resubmitting", index, run_id, kind)
                    submit(index, count + 1)
    return [run_id for run_id, _, _ in submitted.values()]


def online_workers(client, deployment: str) -> int:
    """Workers online in the pool behind `deployment` (at least 1, so that sizing never divides by zero)."""
    pool = client.read_deployment_by_name(deployment).work_pool_name
    workers = client.read_workers_for_work_pool(pool)
    return max(1, sum(1 for w in workers if str(getattr(w, "status", "")).upper().endswith("ONLINE")))


def run_shards(output: str, pipeline: str, plan: dict, settings: dict, shard_size: int,
               workers_deployment: str | None, shards_per_run: int | None, deadline_s: float,
               stall_s: float = STALL_SECONDS) -> None:
    """Runs the plan's pending shards here, or in batches on the pool behind `workers_deployment`, each batch
    one child run that loads its models once. Without `shards_per_run`, batches are sized so that model
    loading stays a small part of each child's estimated compute while every online worker gets work."""
    from bridgecore.batch.fingerprints import run_id
    from bridgecore.batch.settings import JobSettings
    from bridgecore.batch.sizing import child_run_cost
    from bridgecore.batch.sizing import shards_per_run as size_batches
    from vision_bridge.flows.process_shards import process_shards

    shard_ids, job_settings = plan["pending"], JobSettings.from_dict(settings)
    run = run_id(plan["job"], pipeline, job_settings)
    if not shard_ids:
        return
    if workers_deployment is None:
        process_shards(output, shard_ids, settings, pipeline, run)
        return
    if shards_per_run is None:
        with get_client(sync_client=True) as client:
            workers = online_workers(client, workers_deployment)
        shards_per_run = size_batches(len(shard_ids), shard_size, workers, child_run_cost(job_settings, pipeline))
    batches = [shard_ids[i:i + shards_per_run] for i in range(0, len(shard_ids), shards_per_run)]
    parameters = {"output": output, "settings": settings, "pipeline": pipeline, "run": run}
    run_on_workers(workers_deployment, batches, parameters, deadline_s, stuck_s=stall_s)


def run_and_report(output: str, pipeline: str, plan: dict, settings: dict, shard_size: int,
                   workers_deployment: str | None, shards_per_run: int | None, deadline_s: float,
                   verify: bool = False, stall_s: float = None) -> dict:
    """Runs the plan's pending shards, then summarizes them as Prefect artifacts; a result found damaged while
    summarizing is recomputed once, so damage heals within the same run."""
    from vision_bridge.flows.reporting import report_run

    stall_s = STALL_SECONDS if stall_s is None else stall_s
    run_shards(output, pipeline, plan, settings, shard_size, workers_deployment, shards_per_run, deadline_s, stall_s)
    summary = report_run(output, plan["job"], pipeline, settings, verify)
    if summary["damaged"]:
        run_shards(output, pipeline, {**plan, "pending": summary["damaged"]}, settings, shard_size,
                   workers_deployment, shards_per_run, deadline_s, stall_s)
        summary = report_run(output, plan["job"], pipeline, settings)
    return summary
