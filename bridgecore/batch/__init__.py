"""The batch side of vision-bridge: samples, shards, stages and the one executor that runs them.

    records.py      Sample, SampleResult and the fixed Arrow schema of every per-shard table
    sharding.py     inputs -> samples -> deterministic, incremental shards (plan/)
    settings.py     JobSettings, cheap model revisions, the process-wide model pool
    shard_store.py  committed shards of one stage and one fingerprint (data, table, marker)
    stage.py        Stage: what a step is, and how one shard runs through it (isolation, commit)
    stages/         one file per stage: extract, negatives, fuse, edit, evaluate, latents
    pipeline.py     the pipelines (ordered stages), their fingerprints, run_pipeline, summarize

Nothing here imports Prefect: `tasks/` and `flows/` wrap these functions.
"""
