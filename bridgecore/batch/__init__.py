"""The batch side of vision-bridge: samples, shards, stages and the one executor that runs them.

    records.py      Sample, SampleResult and the fixed Arrow schema of every per-shard table
    sharding.py     inputs -> samples -> deterministic, incremental shards (plan/)
    settings.py     JobSettings (`for_job`: the one home of a job's defaults), model revisions, the model pool
    shard_store.py  committed shards of one stage and one fingerprint (data, table, marker)
    stage.py        Stage: what a step is, and how one shard runs through it (isolation, commit)
    code_version.py a stage's code fingerprint, derived from what its file imports
    stages/         one file per stage: extract, negatives, rewrite, fuse, edit, native_*, evaluate, latents
    pipeline.py     the pipelines (ordered stages), their fingerprints, run_pipeline, summarize
    training_data.py  training examples from the training-data pipeline, and run_training

Nothing here imports Prefect: `tasks/` and `flows/` wrap these functions.
"""
