"""`vision-bridge cache status` and `vision-bridge cache prune`: what an output stores, and removing what no run uses."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from vision_bridge.app import app, fail, user_errors

cache_app = typer.Typer(help="What an output stores per stage and fingerprint, and pruning what no run uses.",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""


def _overrides(items: List[str]) -> dict:
    parsed = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            fail(f"--set {item!r}: expected FIELD=VALUE, e.g. --set steps=30")
        try:
            parsed[name] = json.loads(value)
        except ValueError:
            parsed[name] = value  # a bare string: --set bridge=ckpt/bridge-v2
    return parsed


@cache_app.command("status")
def status_command(
    output: str = typer.Argument(..., help="The job's output (local folder or s3://bucket/prefix)."),
    set_: List[str] = typer.Option([], "--set", metavar="FIELD=VALUE",
                                   help="A job setting changed from the output's latest run (repeatable, e.g. "
                                        "--set steps=30 --set bridge=ckpt/v2): which stages would rerun, and why."),
    pipeline: Optional[str] = typer.Option(None, help="The pipeline to plan for (default: the latest run's)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the tables."),
):
    """Per stage and fingerprint: committed shards, samples, bytes and the runs that use it; then, for the latest
    run's settings (with --set changes), which stages a rerun would keep and which it would recompute, and why."""
    from bridgecore.batch.cache_inventory import inventory, latest_job, prunable, rerun_plan, with_overrides
    from bridgecore.storage import Storage

    try:
        storage = Storage(output)
        if not storage.exists():
            fail(f"{output}: no such output")
        stored = inventory(storage)
        job = latest_job(storage)
        plan = None
        if job is not None or set_ or pipeline:
            if job is None:
                fail(f"{output} has no run summary: nothing to compare --set or --pipeline with")
            settings = with_overrides(job[1], _overrides(set_))
            plan = rerun_plan(storage, pipeline or job[0], settings, stored)
    except user_errors() as error:
        fail(str(error))
    unused = prunable(stored, min_age_s=0)
    if as_json:
        typer.echo(json.dumps({"stored": [vars(item) for item in stored], "rerun": plan,
                               "unused_bytes": sum(item.bytes for item in unused)}, default=str))
        return
    if not stored:
        typer.echo(f"{output}: no stage output stored")
    else:
        typer.echo(f"{'stage':<14} {'fingerprint':<17} {'shards':>6} {'samples':>8} {'failed':>6} {'size':>10}  used by")
        for item in stored:
            used = f"{len(item.runs)} run(s): {', '.join(item.runs[:3])}" if item.runs else "no run"
            if item.leases:
                used += f"; {item.leases} shard(s) leased now"
            typer.echo(f"{item.stage:<14} {item.fingerprint:<17} {item.shards:>6} {item.samples:>8} {item.failed:>6} "
                       f"{_size(item.bytes):>10}  {used}")
        unused_line = (f"{len(unused)} used by no run ({_size(sum(item.bytes for item in unused))}: "
                       f"`vision-bridge cache prune {output}` lists them)") if unused else "every one used by a run"
        typer.echo(f"total {_size(sum(item.bytes for item in stored))} in {len(stored)} fingerprint folder(s); "
                   f"{unused_line}")
    if plan is not None:
        changed = f" with {' '.join('--set ' + s for s in set_)}" if set_ else ""
        typer.echo(f"\nthe latest run's {pipeline or job[0]} job{changed}:")
        for entry in plan:
            if entry["stored_shards"]:
                typer.echo(f"  {entry['stage']:<14} kept      {entry['fingerprint']} ({entry['stored_shards']} shards stored)")
            else:
                typer.echo(f"  {entry['stage']:<14} recompute {entry['fingerprint']}: {'; '.join(entry['why'])}")


@cache_app.command("prune")
def prune_command(
    output: str = typer.Argument(..., help="The job's output (local folder or s3://bucket/prefix)."),
    min_age_hours: float = typer.Option(24.0, help="Keep folders committed to more recently than this: a job that is "
                                                   "still running has written no summary yet."),
    yes: bool = typer.Option(False, "--yes", help="Delete. Without it, only list what would be deleted (dry run)."),
):
    """Delete the fingerprint folders no run's summary uses (runs/<run>/summary.json): the outputs of settings and
    code versions no run asks for any more. A dry run unless --yes; a folder with a live lease or a recent commit is
    kept. Deleting a folder some future job would reuse only costs its recomputation."""
    from bridgecore.batch.cache_inventory import inventory, prunable, prune
    from bridgecore.storage import Storage

    if min_age_hours < 0:
        fail(f"--min-age-hours must be >= 0; got {min_age_hours}")
    try:
        storage = Storage(output)
        if not storage.exists():
            fail(f"{output}: no such output")
        stored = inventory(storage)
        doomed = prunable(stored, min_age_s=min_age_hours * 3600)
        for item in doomed:
            typer.echo(f"{'deleting' if yes else 'would delete'} {item.stage}/{item.fingerprint}: {item.shards} shards, "
                       f"{_size(item.bytes)}")
        total = sum(item.bytes for item in doomed)
        if yes:
            freed = prune(storage, doomed)
            typer.echo(f"freed {_size(freed)} ({len(doomed)} fingerprint folder(s))")
        else:
            kept = len(stored) - len(doomed)
            typer.echo(f"dry run: {_size(total)} in {len(doomed)} folder(s) used by no run; {kept} kept; "
                       f"--yes deletes them")
    except user_errors() as error:
        fail(str(error))
