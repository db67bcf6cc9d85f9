"""Fingerprints: a stage's hashes exactly what its output depends on (its settings, model revisions included, its
code, and its upstream stages' fingerprints). Outputs live under `STAGE/FINGERPRINT/`, so a changed setting reruns
exactly the stages downstream of it, and several settings share one output (a baseline and a bridge run share their
caches). A job's shards take their route's fingerprints (single- or multi-image).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

from bridgecore.storage import Storage
from bridgecore.batch.pipelines import pipeline_stages
from bridgecore.batch.records import ROUTES
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.shard_store import ShardStore
from bridgecore.batch.sharding import PLAN_SHARDS
from bridgecore.batch.stage import Stage


def fingerprints(pipeline: str, settings: JobSettings, route: str = "single") -> dict[str, str]:
    """{stage: fingerprint} of the pipeline's enabled stages under these settings, for the shards of one route.

    A single-image shard's outputs are what the job gives without an Edit-Plus `plus_model`, so its route is
    fingerprinted without it: adding `plus_model` to a finished job runs only its multi-image shards.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}; got {route!r}")
    if route == "single" and settings.plus_model:
        settings = replace(settings, plus_model=None)
    result: dict[str, str] = {}
    for stage in pipeline_stages(pipeline, settings):
        upstream = {name: result[name] for name in stage.upstream + stage.optional_upstream if name in result}
        missing = [name for name in stage.upstream if name not in result]
        if missing:
            raise ValueError(f"stage {stage.name} needs {missing} before it in pipeline {pipeline}")
        record = json.dumps(stage.fingerprint_record(settings, upstream), sort_keys=True, default=str)
        result[stage.name] = hashlib.sha256(record.encode()).hexdigest()[:16]
    return result


def route_fingerprints(pipeline: str, settings: JobSettings) -> dict[str, dict[str, str]]:
    """{route: {stage: fingerprint}}."""
    return {route: fingerprints(pipeline, settings, route) for route in ROUTES}


def shard_routes(storage: Storage, shards: list[str]) -> dict[str, str]:
    """{shard: route}, from the shards' plans (a shard whose plan is unreadable counts as single-image)."""
    routes = {}
    for (_, name), data in storage.read_many([(PLAN_SHARDS, f"{shard}.json") for shard in shards]).items():
        try:
            samples = json.loads(data)["samples"]
        except (TypeError, ValueError, KeyError):
            samples = []
        routes[name[: -len(".json")]] = "multi" if any(len(s.get("images") or ()) > 1 for s in samples) else "single"
    return routes


class ShardFingerprints:
    """The fingerprints of each shard of a job: its route's. Plans are read only when the routes differ."""

    def __init__(self, storage: Storage, pipeline: str, settings: JobSettings, shards: list[str],
                 known_routes: dict[str, str] | None = None):
        self.storage, self.settings, self.routes = storage, settings, route_fingerprints(pipeline, settings)
        self.stages = pipeline_stages(pipeline, settings)
        self.differ = self.routes["single"] != self.routes["multi"]
        self.shard_route: dict[str, str] = {}
        if self.differ:
            self.shard_route = dict(known_routes or {})
            self.shard_route.update(shard_routes(storage, [s for s in shards if s not in self.shard_route]))

    def of(self, shard_id: str) -> dict[str, str]:
        return self.routes[self.shard_route.get(shard_id, "single")]

    def record(self) -> dict[str, Any]:
        """What identifies the job's outputs: one route's fingerprints, or both when they differ."""
        return self.routes if self.differ else self.routes["single"]

    def committed(self, shards: list[str]) -> dict[str, set[str]]:
        """{stage: the shards committed under their route's fingerprint}, one listing per stage and route."""
        result = {}
        for stage in self.stages:
            listed: dict[str, set[str]] = {}  # fingerprint -> its committed shards
            for fingerprint in {self.of(shard)[stage.name] for shard in shards}:
                listed[fingerprint] = stage.store(self.storage, fingerprint).done_shards()
            result[stage.name] = {shard for shard in shards if shard in listed[self.of(shard)[stage.name]]}
        return result

    def store(self, stage: Stage, shard_id: str) -> ShardStore:
        return stage.store(self.storage, self.of(shard_id)[stage.name], self.settings)


def run_id(job: str, pipeline: str, settings: JobSettings) -> str:
    routes = route_fingerprints(pipeline, settings)
    prints = routes if routes["single"] != routes["multi"] else routes["single"]
    return hashlib.sha256(json.dumps([job, pipeline, prints], sort_keys=True).encode()).hexdigest()[:16]
