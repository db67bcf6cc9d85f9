"""The batch executor without Prefect: one state per sample, settings-scoped caches (counted model forwards
on the second run), failure isolation in every stage, corrupt upstreams recomputed."""

import io
import json
from dataclasses import replace

import pytest
import torch
from helpers import LOADED, make_image, make_inputs, run_all, save_open_bridge

from bridgecore.batch.executor import run_pipeline
from bridgecore.batch.fingerprints import fingerprints
from bridgecore.batch.job_plan import plan_job
from bridgecore.batch.pipelines import STAGES
from bridgecore.batch.summary import summarize
from bridgecore.batch.records import SampleResult
from bridgecore.batch.model_pool import LoadedModels, ModelPool
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.stage import Stage, StageContext
from bridgecore.batch.sharding import cut_shards, read_inputs, write_plan
from bridgecore.storage import Storage

AREA = 64 * 64


@pytest.fixture()
def settings(tiny_zoo):
    return JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=AREA, steps=2)


@pytest.fixture()
def trained_bridge(tmp_path, settings):
    """A bridge whose gate is open: its output differs from the baseline."""
    return save_open_bridge(settings, tmp_path / "bridge")


def committed(output, stage, settings, pipeline="bulk-edit"):
    return STAGES[stage].store(Storage(output), fingerprints(pipeline, settings)[stage]).done_shards()


def test_every_sample_ends_done_or_failed(tmp_path, settings):
    summary = run_all(make_inputs(tmp_path / "in"), str(tmp_path / "out"), settings)
    assert summary["counts"] == {"done": 5, "failed": 6, "pending": 0}
    reasons = " | ".join(f["error"] for f in summary["failures"])
    for expected in ("file is empty", "not an image", "truncated", "file not found", "outside the input root",
                     "no-such-bucket-xyz"):
        assert expected in reasons
    assert {f["stage"] for f in summary["failures"]} == {"plan", "caches"}
    stored = json.loads((tmp_path / "out" / "runs" / summary["run"] / "summary.json").read_text())
    assert stored["counts"] == summary["counts"] and stored["settings"]["steps"] == 2
    stats = json.loads((tmp_path / "out" / "runs" / summary["run"] / "stats.json").read_text())
    assert stats["caches"]["done"] == 5 and stats["caches"]["failed"] == 6 and stats["caches"]["shards"] == 3
    assert stats["edits"]["samples_per_s"] > 0 and stats["edits"]["workers"]
    # why samples failed, grouped per stage (sample-specific paths blanked), counts adding up to the failures
    reasons = {stage: values["failure_reasons"] for stage, values in stats.items() if "failure_reasons" in values}
    assert sum(sum(r.values()) for r in reasons.values()) == summary["counts"]["failed"] == 6
    assert all("img" not in reason for r in reasons.values() for reason in r)  # no file names: causes, not samples
    # every summary row names its run, arm and pipeline (arms' summaries concatenate)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / "runs" / summary["run"] / "summary.parquet").to_pylist()
    assert {(r["run"], r["arm"], r["pipeline"]) for r in table} == {(summary["run"], "Edit", "bulk-edit")}


def test_second_run_reruns_exactly_what_a_changed_setting_affects(tmp_path, settings, trained_bridge):
    """Same settings: nothing; a bridge: fuse, edit, evaluate without a VLM forward; steps/seed/cfg: edits and
    metrics only; condition area or a model revision: everything."""
    manifest, out = make_inputs(tmp_path / "in", n=3), str(tmp_path / "out")
    run_all(manifest, out, settings)
    edits = lambda s: {p.name: p.read_bytes() for p in (tmp_path / "out" / "edits" / fingerprints("bulk-edit", s)["edits"]).rglob("*.png")}  # noqa: E731

    def delta(new_settings):
        before = LOADED.counts
        summary = run_all(manifest, out, new_settings)
        after = LOADED.counts
        assert summary["counts"] == {"done": 3, "failed": 6, "pending": 0}
        return {k: after[k] - before[k] for k in ("vlm_forwards", "dit_calls")}

    assert delta(settings) == {"vlm_forwards": 0, "dit_calls": 0}

    bridged = replace(settings, bridge=trained_bridge)
    assert delta(bridged)["vlm_forwards"] == 0
    assert committed(out, "caches", bridged) == committed(out, "caches", settings)  # shared, not recomputed
    assert edits(bridged).keys() == edits(settings).keys() and edits(bridged) != edits(settings)

    for changed in (replace(settings, steps=3), replace(settings, seed=7)):
        counts = delta(changed)
        assert counts["vlm_forwards"] == 0 and counts["dit_calls"] > 0
        assert fingerprints("bulk-edit", changed)["fused"] == fingerprints("bulk-edit", settings)["fused"]

    counts = delta(replace(settings, condition_area=48 * 48))
    assert counts["vlm_forwards"] > 0 and counts["dit_calls"] > 0

    # both settings' results stay side by side in one output, each with its own summary
    assert len(list((tmp_path / "out" / "edits").iterdir())) == 5
    assert len(list((tmp_path / "out" / "runs").iterdir())) == 5


def test_cfg_scale_change_reuses_every_extraction(tmp_path, settings):
    manifest, out = make_inputs(tmp_path / "in", n=1), str(tmp_path / "out")
    with_cfg = replace(settings, cfg=4.0, negative_prompt="blurry")
    run_all(manifest, out, settings)
    before = LOADED.counts["vlm_forwards"]
    run_all(manifest, out, with_cfg)  # turning CFG on extracts only the negative prompt's caches
    assert LOADED.counts["vlm_forwards"] == before + 1  # Qwen2.5-VL only: the negative is never bridged
    assert committed(out, "caches", with_cfg) == committed(out, "caches", settings)
    before = LOADED.counts
    run_all(manifest, out, replace(with_cfg, cfg=6.0))
    after = LOADED.counts
    assert after["vlm_forwards"] == before["vlm_forwards"] and after["dit_calls"] > before["dit_calls"]


def test_model_revision_change_reruns_everything(tmp_path, settings, tiny_zoo):
    import shutil

    from bridgecore.model.loading import model_revision

    qwen3 = tmp_path / "qwen3-copy"
    shutil.copytree(tiny_zoo["qwen3-vl"], qwen3)
    copied = replace(settings, qwen3_model=str(qwen3))
    manifest, out = make_inputs(tmp_path / "in", n=1), str(tmp_path / "out")
    run_all(manifest, out, copied)
    config = json.loads((qwen3 / "config.json").read_text())
    (qwen3 / "config.json").write_text(json.dumps({**config, "vision_bridge_note": "retrained"}))
    model_revision.cache_clear()  # a new worker process would see the new revision anyway
    before = LOADED.counts["vlm_forwards"]
    run_all(manifest, out, copied)
    assert LOADED.counts["vlm_forwards"] > before
    assert len(list((tmp_path / "out" / "caches").iterdir())) == 2


def test_dotted_ids_and_models_loaded_once_across_shards(tmp_path, tiny_zoo):
    folder = tmp_path / "in"
    folder.mkdir()
    rows = []
    for i in range(4):
        make_image(200, 120, i).save(folder / f"photo.{i:03d}.png")
        rows.append({"id": f"photo.{i:03d}", "image": f"photo.{i:03d}.png", "instruction": f"edit {i}"})
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    settings = JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=40 * 40,
                           steps=2)
    own = LoadedModels()  # this run's models, owned by it: its counters are this job's alone
    summary = run_all(str(folder / "m.jsonl"), str(tmp_path / "out"), settings, shard_size=1, loaded=own)
    assert summary["counts"] == {"done": 4, "failed": 0, "pending": 0} and summary["shards"] == 4
    for model in ("qwen3_loads", "qwen25_loads", "pipeline_loads"):
        assert own.counts[model] == 1, model
    assert own.counts["vlm_forwards"] == 8 and own.counts["dit_calls"] == 4  # 2 VLMs and 1 DiT call per shard


class FlakyStage(Stage):
    """A stage that fails on one sample, and runs out of memory on batches larger than two."""

    name = "flaky"

    def process(self, items, ctx):
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        if any(item.sample.instruction == "poison" for item in items):
            raise RuntimeError("poisoned sample")
        self.batches.append(len(items))
        return [SampleResult.done(item.sample, {"txt": b"ok"}) for item in items]


def test_failures_are_isolated_per_sample_and_oom_halves_the_batch(tmp_path, settings):
    folder = tmp_path / "in"
    folder.mkdir()
    make_image().save(folder / "a.png")
    rows = [{"id": f"s{i}", "image": "a.png", "instruction": "poison" if i == 5 else f"edit {i}"} for i in range(8)]
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    storage = Storage(str(tmp_path / "out"))
    (shard,) = cut_shards(read_inputs(str(folder / "m.jsonl")), 8).items()
    write_plan(storage, dict([shard]))
    stage = FlakyStage()
    stage.batches = []
    ctx = StageContext(storage, replace(settings, batch_size=8), {"flaky": "fp"}, ModelPool(settings))
    marker = stage.run_shard(ctx, shard[0])
    assert marker["counts"] == {"done": 7, "failed": 1}
    assert max(stage.batches) <= 2 and sum(stage.batches) == 7
    rows = stage.store(storage, "fp").read(shard[0]).rows
    assert "poisoned sample" in rows["s5"]["error"] and json.loads(rows["s5"]["info"])["failed_at"] == "flaky"


def test_corrupt_or_missing_upstream_is_recomputed(tmp_path, settings):
    manifest, out = make_inputs(tmp_path / "in", n=2), str(tmp_path / "out")
    plan = plan_job(manifest, out, settings, shard_size=20)
    run_pipeline(out, "build-caches", plan.shards, settings, progress=False, loaded=LOADED)
    prints = fingerprints("bulk-edit", settings)
    tar = tmp_path / "out" / "caches" / prints["caches"] / "data" / f"{plan.shards[0]}.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    before = LOADED.counts["vlm_forwards"]
    run_pipeline(out, "bulk-edit", plan.shards, settings, progress=False, loaded=LOADED)
    assert LOADED.counts["vlm_forwards"] > before  # recomputed, never used corrupt
    assert summarize(out, plan.job, "bulk-edit", settings)["counts"]["done"] == 2

    # a deleted marker: the shard is pending again (never silently), and a rerun recomputes just that stage
    (tmp_path / "out" / "fused" / prints["fused"] / "_done" / f"{plan.shards[0]}.json").unlink()
    assert summarize(out, plan.job, "bulk-edit", settings)["counts"] == {"done": 0, "failed": 6, "pending": 2}
    again = plan_job(manifest, out, settings, shard_size=20)
    assert again.pending == plan.shards and again.stages["fused"] == {"committed": 0, "to_run": 1}
    before = LOADED.counts
    run_pipeline(out, "bulk-edit", again.pending, settings, progress=False, loaded=LOADED)
    assert LOADED.counts == before  # the bridge only: no VLM forward, no DiT call
    assert summarize(out, plan.job, "bulk-edit", settings)["counts"]["done"] == 2


def test_stages_on_object_storage(tmp_path, settings, s3_root):
    summary = run_all(make_inputs(tmp_path / "in", n=2), s3_root, settings)
    assert summary["counts"]["done"] == 2
    storage = Storage(s3_root)
    assert storage.read_json("summary.json")["counts"] == summary["counts"]
    import pyarrow.parquet as pq

    rows = pq.read_table(io.BytesIO(storage.read_bytes("summary.parquet"))).to_pylist()
    outputs = [row["output"] for row in rows if row["status"] == "done"]
    assert len(outputs) == 2 and all(uri.startswith(s3_root) and storage.fs.exists(uri) for uri in outputs)


def test_true_cfg_uses_negative_embeddings(tmp_path, settings):
    manifest = make_inputs(tmp_path / "in", n=1)
    outputs = {}
    for cfg in (1.0, 4.0):
        out = tmp_path / f"cfg{cfg}"
        job = replace(settings, cfg=cfg, negative_prompt="blurry")
        run_all(manifest, str(out), job, shard_size=20)
        outputs[cfg] = {p.name: p.read_bytes() for p in out.rglob("*.png")}
        assert bool(committed(str(out), "negatives", job) if cfg > 1 else False) == (cfg > 1)
    assert outputs[1.0].keys() == outputs[4.0].keys() and outputs[1.0] != outputs[4.0]


def test_batched_cfg_in_a_job_gives_the_sequential_edits(tmp_path, settings):
    """The batch_cfg setting reaches the job's DiT (its hook batched steps) and the stored edits are the
    sequential ones (float32 rounding: at most one grey level in the PNGs)."""
    import numpy as np
    from PIL import Image

    from torch.nn.modules.module import register_module_forward_hook

    manifest = make_inputs(tmp_path / "in", n=2)
    images, block_batches = {}, {}
    for batch_cfg in (False, True):
        out, seen = tmp_path / f"batched-{batch_cfg}", []

        def count(module, args, output):  # every DiT block call of the job, with its batch size
            if type(module).__name__ == "QwenImageTransformerBlock":
                seen.append(output[1].shape[0])

        handle = register_module_forward_hook(count)
        try:
            run_all(manifest, str(out), replace(settings, cfg=4.0, negative_prompt="blurry", batch_cfg=batch_cfg),
                    shard_size=20)
        finally:
            handle.remove()
        images[batch_cfg] = {p.name: np.asarray(Image.open(p)).astype(int) for p in out.rglob("*.png")}
        block_batches[batch_cfg] = seen
    # sequential: the two branches apart (one edit of two same-size samples: a batch of 2 per branch); batched: one
    # batch of 4 per step after the first
    assert set(block_batches[False]) == {2} and 4 in block_batches[True]
    assert len(block_batches[True]) < len(block_batches[False])
    assert images[True] and images[True].keys() == images[False].keys()
    assert all(np.abs(images[True][name] - images[False][name]).max() <= 1 for name in images[True])


def test_retry_failed_replans_only_failed_samples(tmp_path, settings):
    folder = tmp_path / "in"
    make_inputs(folder, n=1)
    (folder / "m.jsonl").write_text(json.dumps({"id": "good", "image": "img0.png", "instruction": "x"}) + "\n"
                                    + json.dumps({"id": "flaky", "image": "late.png", "instruction": "x"}))
    out = str(tmp_path / "out")
    summary = run_all(str(folder / "m.jsonl"), out, settings, shard_size=1)
    assert summary["counts"] == {"done": 1, "failed": 1, "pending": 0}
    assert plan_job(str(folder / "m.jsonl"), out, settings, shard_size=1).pending == []
    make_image().save(folder / "late.png")  # the missing file appears: the same sample can now succeed
    retry = run_all(str(folder / "m.jsonl"), out, settings, shard_size=1, retry_failed=True)
    assert retry["counts"] == {"done": 2, "failed": 0, "pending": 0}
    assert len(Storage(out).list("plan/shards")) == 3


@pytest.mark.slow
def test_mixed_manifest_routes_each_sample_to_a_pipeline_that_takes_it(tmp_path, tiny_zoo):
    """Single- and multi-image samples in one job: with `plus_model`, the multi-image ones run on Edit-Plus and
    get the very edits an Edit-Plus job gives them; the single-image ones those of an Edit job. Without it,
    they fail with the hint; adding it to the finished job runs only the multi-image shard."""
    folder = tmp_path / "in"
    folder.mkdir()
    rows = []
    for i in range(3):
        make_image(200, 120, i).save(folder / f"a{i}.png")
        make_image(120, 200, i + 3).save(folder / f"b{i}.png")
        rows.append({"id": f"single{i}", "image": f"a{i}.png", "instruction": f"make shape {i} blue"})
        rows.append({"id": f"set{i}", "images": [f"a{i}.png", f"b{i}.png"], "instruction": "put the circle of "
                     "picture 2 into picture 1"})
    (folder / "all.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "single.jsonl").write_text("\n".join(json.dumps(r) for r in rows if "image" in r))
    (folder / "multi.jsonl").write_text("\n".join(json.dumps(r) for r in rows if "images" in r))
    edit = JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=AREA, steps=2)
    plus = replace(edit, edit_model=str(tiny_zoo["qwen-image-edit-plus"]))
    mixed = replace(edit, plus_model=str(tiny_zoo["qwen-image-edit-plus"]))

    def edits(manifest, settings, out=None):
        out = out or tmp_path / f"out-{manifest}-{settings.plus_model is not None}-{settings.edit_model[-4:]}"
        summary = run_all(str(folder / manifest), str(out), settings, shard_size=4)
        return summary, {r["id"]: open(r["output"], "rb").read() for r in summary_rows(out) if r["status"] == "done"}

    def markers(out):
        return {path.relative_to(out): path.read_bytes() for path in out.rglob("_done/*.json")}

    job = tmp_path / "job"
    without, _ = edits("all.jsonl", edit, job)
    assert without["counts"] == {"done": 3, "failed": 3, "pending": 0}
    assert all("--plus-model" in f["error"] for f in without["failures"])
    before = markers(job)
    summary, routed = edits("all.jsonl", mixed, job)  # the same output: only the multi-image shard runs again
    assert summary["counts"] == {"done": 6, "failed": 0, "pending": 0}
    after = markers(job)
    assert all(after[path] == data for path, data in before.items())  # nothing of the first run rewritten
    multi_shard = {row["shard"] for row in summary_rows(job) if row["id"].startswith("set")}
    assert {path.stem for path in set(after) - set(before)} == multi_shard and len(multi_shard) == 1
    assert summary["fingerprints"] == without["fingerprints"] != summary["multi_image_fingerprints"]
    _, singles = edits("single.jsonl", edit)
    summary, multis = edits("multi.jsonl", plus)  # an Edit-Plus job: multi-image samples through every stage
    assert summary["counts"] == {"done": 3, "failed": 0, "pending": 0}
    assert routed == {**singles, **multis}


def test_a_bridge_that_cannot_serve_the_edit_plus_samples_is_refused_at_planning(tmp_path, settings, trained_bridge):
    """The bridge was trained on Qwen-Image-Edit's conditioning: with multi-image samples routed to an Edit-Plus model
    the job stops at planning with one line, before anything is planned; without such samples it plans."""
    folder = tmp_path / "in"
    folder.mkdir()
    make_image(200, 120, 0).save(folder / "a.png")
    make_image(120, 200, 1).save(folder / "b.png")
    rows = [{"id": "single", "image": "a.png", "instruction": "make it blue"},
            {"id": "set", "images": ["a.png", "b.png"], "instruction": "put picture 2 into picture 1"}]
    (folder / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "single.jsonl").write_text(json.dumps(rows[0]))
    routed = replace(settings, bridge=trained_bridge, plus_model=settings.edit_model.replace("qwen-image-edit",
                                                                                            "qwen-image-edit-plus"))
    with pytest.raises(ValueError, match="was trained on .*qwen-image-edit's conditioning and cannot serve the "
                                         "multi-image samples"):
        plan_job(str(folder / "mixed.jsonl"), str(tmp_path / "out"), routed)
    assert list((tmp_path / "out").iterdir()) == []  # nothing planned
    assert plan_job(str(folder / "single.jsonl"), str(tmp_path / "out"), routed).samples == 1


def test_a_mixed_job_keeps_one_dit_and_one_vlm_pair_resident(tiny_zoo):
    """Two DiTs (or two VLM pairs) do not fit one GPU: switching editor frees the other's models of that kind."""
    mixed = JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=AREA,
                        plus_model=str(tiny_zoo["qwen-image-edit-plus"]))
    pool = ModelPool(mixed)
    edit, plus = pool.editor, pool.plus_editor
    edit._pipe.get(), edit.extractor._qwen3.get(), plus._pipe.get()
    pool.use(plus, ("dit",))
    assert plus._pipe.loaded and not edit._pipe.loaded and edit.extractor._qwen3.loaded
    pool.use(edit, ("vlm",))
    assert edit.extractor._qwen3.loaded and not plus.extractor._qwen3.loaded
    with pytest.raises(ValueError, match="a LoRA is made for one DiT"):
        replace(mixed, lora=("some/lora",)).check_editor()
    pool.release(keep=())


def summary_rows(out):
    import pyarrow.parquet as pq

    return pq.read_table(out / "summary.parquet").to_pylist()


def test_edits_do_not_depend_on_sharding(tmp_path, settings):
    """Same noise per sample whatever the shard; only batched-matmul rounding may differ (<= 2/255)."""
    import numpy as np
    from PIL import Image

    manifest = make_inputs(tmp_path / "in", n=4)
    outputs = {}
    for size in (1, 3):
        out = tmp_path / f"out{size}"
        run_all(manifest, str(out), settings, shard_size=size)
        outputs[size] = {p.name: np.asarray(Image.open(p), dtype=int) for p in out.rglob("*.png")}
    assert len(outputs[1]) == 4 and outputs[1].keys() == outputs[3].keys()
    for name, image in outputs[1].items():
        assert np.abs(image - outputs[3][name]).max() <= 2, name


def test_fingerprints_need_only_config_files(tmp_path, monkeypatch):
    """A job naming hub models is fingerprinted from their config files alone: no weights on the control pool."""
    import huggingface_hub.constants

    from bridgecore.model.loading import model_revision

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    for repo, config in (("qwen3", "config.json"), ("edit", "model_index.json")):
        folder = tmp_path / f"models--org--{repo}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(repo[0] * 40)
        (folder / "snapshots" / (repo[0] * 40)).mkdir(parents=True)
        (folder / "snapshots" / (repo[0] * 40) / config).write_text(
            json.dumps({"_class_name": "QwenImageEditPipeline"} if repo == "edit" else {}))
    model_revision.cache_clear()
    settings = JobSettings("org/qwen3", "org/edit")
    prints = fingerprints("bulk-edit", settings)
    assert set(prints) == {"caches", "fused", "edits", "metrics"}
    assert STAGES["caches"].settings_of(settings)["qwen3_revision"] == "q" * 40
    model_revision.cache_clear()


def test_a_lora_reruns_only_the_edits(tmp_path, settings, tiny_zoo):
    from bridgecore.zoo.tiny_zoo import build_tiny_lora

    lora = build_tiny_lora(tmp_path / "style.safetensors", tiny_zoo["qwen-image-edit"])
    manifest, out = make_inputs(tmp_path / "in", n=1), str(tmp_path / "out")
    run_all(manifest, out, settings)
    styled = replace(settings, lora=(f"{lora}:0.8",))
    before = LOADED.counts
    run_all(manifest, out, styled)
    after = LOADED.counts
    assert after["vlm_forwards"] == before["vlm_forwards"] and after["dit_calls"] > before["dit_calls"]
    assert fingerprints("bulk-edit", styled)["fused"] == fingerprints("bulk-edit", settings)["fused"]
    assert fingerprints("bulk-edit", styled)["edits"] != fingerprints("bulk-edit", replace(settings, lora=(f"{lora}:0.5",)))["edits"]


def test_progress_comes_from_the_markers_with_a_rate_and_an_eta(tmp_path, settings):
    """What the dispatcher shows while children run: per stage, committed shards and their samples done/failed
    (the markers' counts), a rate and an ETA once something moved; a finished job is at 100%."""
    from bridgecore.batch.progress import JobProgress

    output = str(tmp_path / "out")
    plan = plan_job(make_inputs(tmp_path / "in"), output, settings, "bulk-edit", shard_size=4)
    progress = JobProgress(output, "bulk-edit", settings, plan.pending).look()
    assert progress.fraction == 0 and progress.eta_s is None and len(plan.pending) == 3
    run_pipeline(output, "bulk-edit", plan.pending[:1], settings, progress=False, loaded=LOADED)
    progress.look()
    assert all(stage.shards == 1 for stage in progress.stages.values())
    assert 0 < progress.fraction < 1 and progress.eta_s > 0 and progress.samples_per_s > 0
    run_pipeline(output, "bulk-edit", plan.pending[1:], settings, progress=False, loaded=LOADED)
    progress.look()
    summary = summarize(output, plan.job, "bulk-edit", settings)
    caches = progress.stages["caches"]
    assert progress.fraction == 1 and (caches.done, caches.failed) == (5, 6)  # as stats.json counts them
    assert progress.stages["edits"].done == summary["counts"]["done"] == 5
    assert "edits 3/3 (5 done" in progress.line() and "ETA 0m00s" in progress.line()


def test_a_limited_trial_run_is_reused_by_the_full_job(tmp_path, settings):
    """--limit N: the first N samples with the job's own fingerprints; the full run then computes only the rest."""
    output, manifest = str(tmp_path / "out"), make_inputs(tmp_path / "in")
    trial = plan_job(manifest, output, settings, "bulk-edit", shard_size=4, limit=4)
    assert trial.samples == 4 and trial.pending_samples == 4
    run_pipeline(output, "bulk-edit", trial.pending, settings, progress=False, loaded=LOADED)
    full = plan_job(manifest, output, settings, "bulk-edit", shard_size=4)
    assert full.samples == 11 and set(trial.shards) <= set(full.shards)
    assert not set(trial.shards) & set(full.pending) and full.pending_samples == 7  # the trial's shards are done
    with pytest.raises(ValueError, match="limit must be at least 1"):
        plan_job(manifest, output, settings, "bulk-edit", limit=0)


def test_edits_as_a_webdataset_reuse_the_extraction_and_read_back_as_the_pngs(tmp_path, settings):
    """edits_format="webdataset" after a PNG run in the same output: only the edits (and what reads them) rerun,
    each shard's edits are one tar of <key>.png + <key>.json that WebDataset reads, the summary's outputs are
    fsspec tar:// URLs, and every image is byte-identical to its PNG twin."""
    import fsspec
    import pyarrow.parquet as pq
    import webdataset as wds

    from bridgecore.model.images import load_image

    output, manifest = str(tmp_path / "out"), make_inputs(tmp_path / "in")
    pngs = run_all(manifest, output, settings)
    tar_settings = replace(settings, edits_format="webdataset")
    before = LOADED.counts
    tars = run_all(manifest, output, tar_settings)
    after = LOADED.counts
    assert after["vlm_forwards"] == before["vlm_forwards"] and after["dit_calls"] > before["dit_calls"]
    prints, tar_prints = fingerprints("bulk-edit", settings), fingerprints("bulk-edit", tar_settings)
    assert prints["fused"] == tar_prints["fused"] and prints["edits"] != tar_prints["edits"]
    assert tars["counts"] == pngs["counts"] == {"done": 5, "failed": 6, "pending": 0}
    folder = tmp_path / "out" / "edits" / tar_prints["edits"] / "data"
    shards_with_edits = {r["shard"] for r in pq.read_table(tmp_path / "out" / "runs" / tars["run"] / "summary.parquet")
                         .to_pylist() if r["status"] == "done"}  # a shard of failed samples only writes no tar
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{shard}.tar" for shard in shards_with_edits)
    samples = [s for s in wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False)]
    assert len(shards_with_edits) >= 2  # 5 images in one object per shard, not one per image
    assert len(samples) == 5 and all({"png", "json"} <= set(s) for s in samples)
    meta = [json.loads(s["json"]) for s in samples]
    assert sorted(m["instruction"] for m in meta) == sorted(
        r["instruction"] for r in map(json.loads, open(manifest)) if "shape" in r["instruction"])

    png_rows = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "runs" / pngs["run"] / "summary.parquet").to_pylist()}
    tar_rows = pq.read_table(tmp_path / "out" / "runs" / tars["run"] / "summary.parquet").to_pylist()
    for row in (r for r in tar_rows if r["status"] == "done"):
        assert row["output"].startswith("tar://") and row["output"].endswith(".tar")
        with fsspec.open(row["output"], "rb") as handle, open(png_rows[row["id"]]["output"], "rb") as png:
            assert handle.read() == png.read()
        assert load_image(row["output"]).size == load_image(png_rows[row["id"]]["output"]).size


def test_the_step_cache_changes_only_the_edits_fingerprints(settings):
    """The fast mode is an approximation: its edits (and the scores read from them) get their own fingerprint, the
    extraction and the fused embeddings are shared with the exact job; out-of-range thresholds are refused."""
    exact, fast = fingerprints("bulk-edit", settings), fingerprints("bulk-edit", replace(settings, step_cache=0.2))
    assert {stage for stage in exact if exact[stage] != fast[stage]} == {"edits", "metrics"}
    with pytest.raises(ValueError, match=r"step_cache must be in \[0, 1\)"):
        replace(settings, step_cache=1.5)


def test_what_cannot_run_here_fails_the_stage_and_commits_no_sample(tmp_path, settings):
    """FP8 matmuls without FP8 tensor cores fail every sample the same way: committing a failure per sample (after
    the extraction) made the same job on a capable card need --retry-failed. The stage fails whole instead, and
    the extraction it needed stays committed."""
    import torch

    from bridgecore.model.speed import CannotRunHereError

    manifest, out = make_inputs(tmp_path / "in", n=2), str(tmp_path / "out")
    broken = replace(settings, lora=(str(tmp_path / "missing.safetensors"),))  # a LoRA no sample can load
    with pytest.raises(CannotRunHereError, match="could not be loaded"):
        run_pipeline(out, "bulk-edit", plan_job(manifest, out, broken, shard_size=20).shards, broken, progress=False)
    assert not list((tmp_path / "out" / "edits").glob("*/_done/*.json"))
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine runs FP8 matmuls")
    fp8 = replace(settings, fp8="dynamic")
    plan = plan_job(manifest, out, fp8, shard_size=20)
    with pytest.raises(CannotRunHereError, match="compute capability 8.9"):
        run_pipeline(out, "bulk-edit", plan.shards, fp8, progress=False)
    prints = fingerprints("bulk-edit", fp8)
    assert list((tmp_path / "out" / "caches" / prints["caches"] / "_done").glob("*.json"))
    assert not list((tmp_path / "out" / "edits").glob("*/_done/*.json"))


def test_fp8_changes_only_the_edits_fingerprints_and_batched_cfg_none(settings):
    """FP8 is an approximation (its own edits), batched CFG only reorders the same arithmetic (no new fingerprint);
    combinations that were never run together are refused with the option names."""
    exact = fingerprints("bulk-edit", settings)
    fp8 = fingerprints("bulk-edit", replace(settings, fp8="weights"))
    assert {stage for stage in exact if exact[stage] != fp8[stage]} == {"edits", "metrics"}
    assert fingerprints("bulk-edit", replace(settings, cfg=4.0)) == fingerprints(
        "bulk-edit", replace(settings, cfg=4.0, batch_cfg=True))
    with pytest.raises(ValueError, match="fp8 must be one of off, dynamic, weights"):
        replace(settings, fp8="int8")
    with pytest.raises(ValueError, match="fp8 with --dit-offload"):
        replace(settings, fp8="dynamic", dit_offload=True)
    with pytest.raises(ValueError, match="batch-cfg with --step-cache"):
        replace(settings, batch_cfg=True, step_cache=0.1)
    with pytest.raises(ValueError, match="--attention-backend must be one of"):  # before planning, not per sample
        replace(settings, attention_backend="fastest")


def test_failure_reasons_group_causes_not_samples():
    """One cause, one reason: paths (absolute, relative, URLs), quoted names, storage keys and numbers blanked;
    an apostrophe inside a word is not a quote."""
    from bridgecore.batch.summary import failure_reason, failure_reasons

    same = ["file not found: /in/a.png", "file not found: /in/sub/b.png", "file not found: s3://bucket/c.png"]
    assert len({failure_reason(e) for e in same}) == 1
    assert failure_reason("images/a.png: file not found") == failure_reason("images/b.png: file not found")
    assert failure_reason("sample a~0123456789abcdef missing") == failure_reason("sample b~fedcba9876543210 missing")
    assert failure_reason("image 12x3 too small") == failure_reason("image 640x48 too small")
    assert failure_reason("can't decode 'x.png', isn't an image") == "can't decode '…', isn't an image"
    assert failure_reasons([{"stage": "caches", "error": e} for e in same]) == {"caches": {"file not found: <path>": 3}}


def test_reference_pictures_reach_qwen3_only_and_need_a_bridge_trained_for_them(tmp_path, settings, trained_bridge):
    """A manifest column `reference_images`: cached for Qwen3-VL only (after the condition image), part of the
    sample's identity, and refused in one line at planning without a bridge, or with one not trained for them."""
    from bridgecore.batch.stages.outputs import CACHES
    from bridgecore.model.bridge import VisionCacheBridge

    folder = tmp_path / "in"
    folder.mkdir()
    make_image(200, 120, 0).save(folder / "a.png")
    make_image(64, 64, 1).save(folder / "swatch.png")
    row = {"id": "r", "image": "a.png", "instruction": "make the box the colour of the reference",
           "reference_images": ["swatch.png"]}
    (folder / "m.jsonl").write_text(json.dumps(row) + "\n")
    manifest, out = str(folder / "m.jsonl"), str(tmp_path / "out")
    with pytest.raises(ValueError, match="only Qwen3-VL reads them, and without --bridge"):
        plan_job(manifest, out, settings)
    with pytest.raises(ValueError, match="was trained with none"):
        plan_job(manifest, out, replace(settings, bridge=trained_bridge))
    plan = plan_job(manifest, out, settings, "build-caches", shard_size=4)
    run_pipeline(out, "build-caches", plan.pending, settings, progress=False, loaded=LOADED)
    store = STAGES["caches"].store(Storage(out), fingerprints("build-caches", settings)["caches"])
    (shard,) = store.done_shards()
    cache = CACHES.read(store.read(shard).payloads["r"])
    assert cache.qwen3.grid_thw.shape[0] == 2 and cache.qwen3.reference_images == 1
    assert cache.qwen25.grid_thw.shape[0] == 1 and cache.qwen3.image_digest == cache.qwen25.image_digest
    assert json.loads(store.table(shard)[0]["info"])["reference_images"] == 1
    # a bridge trained for one reference picture takes the sample (and its forward reads the reference)
    config = VisionCacheBridge.from_pretrained(trained_bridge).config
    fitted = VisionCacheBridge(replace(config, reference_images=1))
    fitted.load_state_dict(VisionCacheBridge.from_pretrained(trained_bridge).state_dict())
    fitted.save_pretrained(tmp_path / "reference-bridge")
    assert plan_job(manifest, out, replace(settings, bridge=str(tmp_path / "reference-bridge"))).samples == 1
    with torch.no_grad():
        other = replace(cache.qwen3, levels={k: v.clone() for k, v in cache.qwen3.levels.items()})
        first_reference = int(cache.qwen3.vision_positions[-(int(cache.qwen3.grid_thw[1].prod()) // 4)])
        for level in other.levels.values():
            level[first_reference:first_reference + 4] += 1.0  # only the reference's tokens change
        assert not torch.equal(fitted(cache.qwen3, cache.qwen25).prompt_embeds, fitted(other, cache.qwen25).prompt_embeds)
    # the reference is part of the sample: another reference picture is another sample
    before = read_inputs(manifest)[0]
    make_image(64, 64, 2).save(folder / "swatch.png")
    assert read_inputs(manifest)[0].input_hash != before.input_hash and before.references[0].endswith("swatch.png")


def test_writing_the_same_sample_set_again_changes_no_input(tmp_path, settings):
    """The main job writes its sample set on every run: files already holding the same bytes are left alone, so a
    second run plans the same shards and finds them finished (every run planned new shards and recomputed all)."""
    import os
    import time

    from bridgecore.zoo.synthetic_triplets import write_triplets

    manifest = write_triplets(tmp_path / "in", 3, size=64, seed=7)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "in").iterdir()}
    first = plan_job(str(manifest), str(tmp_path / "out"), settings, shard_size=4)
    time.sleep(0.05)
    write_triplets(tmp_path / "in", 3, size=64, seed=7)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "in").iterdir()} == stamps
    second = plan_job(str(manifest), str(tmp_path / "out"), settings, shard_size=4)
    assert second.shards == first.shards and len(os.listdir(tmp_path / "out" / "plan" / "shards")) == len(first.shards)
    write_triplets(tmp_path / "in", 3, size=64, seed=8)  # other content: rewritten, new samples
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "in").iterdir()} != stamps


class WordCountStage(Stage):
    """A toy stage added the documented way: one class, its object in a pipeline's tuple (and in STAGES)."""

    name = "word-counts"
    upstream = ("caches",)
    layout = "table"

    def process(self, items, ctx):
        assert all(item.has(CACHES_OUTPUT) for item in items)  # it reads what its upstream stage committed
        return [SampleResult.done(item.sample, words=len(item.sample.instruction.split())) for item in items]


from bridgecore.batch.stages.outputs import CACHES as CACHES_OUTPUT  # noqa: E402


def test_a_new_stage_is_one_class_and_one_line_in_a_pipeline(tmp_path, settings, monkeypatch):
    from bridgecore.batch.pipelines import CACHES, PIPELINES, Pipeline

    stage = WordCountStage()
    monkeypatch.setitem(STAGES, stage.name, stage)
    monkeypatch.setitem(PIPELINES, "toy", Pipeline("toy", (CACHES, stage), scored=False))
    manifest, out = make_inputs(tmp_path / "in", n=2), str(tmp_path / "out")
    plan = plan_job(manifest, out, settings, "toy")
    run_pipeline(out, "toy", plan.pending, settings, progress=False, loaded=LOADED)
    summary = summarize(out, plan.job, "toy", settings)
    assert summary["counts"] == {"done": 2, "failed": 6, "pending": 0} and summary["fingerprints"].keys() == {"caches", "word-counts"}
    rows = [row for shard in plan.shards for row in STAGES["word-counts"].store(Storage(out), summary["fingerprints"]["word-counts"]).table(shard)]
    assert sorted(json.loads(row["info"])["words"] for row in rows if row["status"] == "done") == [4, 4]
    # its caches are the bulk-edit job's: the same fingerprint, so a bulk-edit job afterwards extracts nothing
    assert summary["fingerprints"]["caches"] == fingerprints("bulk-edit", settings)["caches"]
    before = LOADED.counts["vlm_forwards"]
    run_all(manifest, out, settings)
    assert LOADED.counts["vlm_forwards"] == before
