"""Flow `train-bridge`: train the bridge against the frozen DiT from precomputed caches, on one GPU or on
`nproc_per_node` GPUs of the worker (torch.distributed, one process each).

    prefect deployment run train-bridge/default --param data=s3://bucket/caches --param out=s3://bucket/bridge-v1
    prefect deployment run train-bridge/multi-gpu --param data=s3://bucket/caches --param out=s3://bucket/bridge-v1
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from bridgecore.batch.settings import JOB_DEFAULTS as D
from bridgecore.batch.settings import settings_for_job
from bridgecore.batch.sharding import CACHE_SHARD_SIZE
from bridgecore.storage import Storage
from bridgecore.training.trainer import TRAINING_DEFAULTS as T
from vision_bridge.flows.naming import artifact_key, job_tags, run_name, speaks_in_parameters, tag_this_run
from vision_bridge.tasks.train import train_bridge_task


@flow(name="train-bridge", flow_run_name=run_name("train-bridge"))
@speaks_in_parameters
def train_bridge(data: str, out: str, qwen3: str | None = None, edit_model: str | None = None,
                 steps: int = T["steps"], batch_size: int = T["batch_size"],
                 grad_accumulation: int = T["grad_accumulation"], learning_rate: float = T["learning_rate"],
                 eval_every: int = T["eval_every"], seed: int = T["seed"], condition_area: int = D["condition_area"],
                 device: str = D["device"], load_in_8bit: bool = D["load_in_8bit"], rank: int = T["rank"],
                 ablate_qwen3: str = T["ablate_qwen3"], mode: str = T["mode"], num_tokens: int = T["num_tokens"],
                 nproc_per_node: int = 1, data_streams: int | None = None, shuffle_buffer: int = T["shuffle_buffer"],
                 data_workers: int = T["data_workers"], shard_size: int = CACHE_SHARD_SIZE,
                 cache_dtype: str = D["cache_dtype"], cache_deepstack: bool = D["cache_deepstack"],
                 qwen3_area: int | None = D["qwen3_area"]) -> dict:
    # train
    tag_this_run(job_tags("train-bridge", out))
    # the same settings as the build-caches job that wrote the caches: its fingerprints find them
    settings = settings_for_job(dict(qwen3=qwen3, edit_model=edit_model, device=device, condition_area=condition_area,
                                     load_in_8bit=load_in_8bit, cache_dtype=cache_dtype,
                                     cache_deepstack=cache_deepstack, qwen3_area=qwen3_area), route_multi_image=False)
    config = dict(steps=steps, batch_size=batch_size, grad_accumulation=grad_accumulation, learning_rate=learning_rate,
                  eval_every=eval_every,
                  checkpoint_every=eval_every, seed=seed, ablate_qwen3=ablate_qwen3,
                  data_streams=data_streams or nproc_per_node, shuffle_buffer=shuffle_buffer, data_workers=data_workers)
    metrics = train_bridge_task(data, out, settings.to_dict(), config, {"rank": rank, "mode": mode,
                                                                       "num_tokens": num_tokens}, nproc_per_node,
                                shard_size)
    # report: the loss curve wherever --out is (a local folder or object storage)
    storage = Storage(out)
    if storage.exists("loss_curve.png"):
        import base64

        curve = storage.read_bytes("loss_curve.png")
        create_markdown_artifact(f"![loss curve](data:image/png;base64,{base64.b64encode(curve).decode()})",
                                 key=artifact_key("bridge-loss-curve", out))
    create_markdown_artifact(
        f"# Bridge training\n\n| held-out loss | value |\n|---|---|\n"
        f"| zero-init bridge (Qwen-Image-Edit as is) | {metrics['heldout_loss_baseline']:.5f} |\n"
        f"| trained bridge | {metrics['heldout_loss_trained']:.5f} |\n"
        f"| trained bridge, Qwen3 caches shuffled across samples | {metrics['heldout_loss_qwen3_shuffled']:.5f} |\n\n"
        f"Qwen3 information gain (shuffled - trained): {metrics['qwen3_information_gain']:+.6f}, 95% CI "
        f"[{metrics['qwen3_information_gain_ci'][0]:+.6f}, {metrics['qwen3_information_gain_ci'][1]:+.6f}] "
        f"(ablation: {ablate_qwen3})\n\nheld-out loss with one Qwen3 level zeroed: "
        + ", ".join(f"{level} {loss:.5f}" for level, loss in metrics["heldout_loss_level_zeroed"].items())
        + f"\n\nbridge: {mode}, K={num_tokens}; {metrics['world_size']} process(es), {metrics['data_streams']} data "
        f"stream(s), global batch {metrics['global_batch']}, {metrics['samples_per_s']:.1f} samples/s, "
        f"{metrics['data_wait_share']:.0%} waiting for data; checkpoint: `{out}`\n",
        key=artifact_key("bridge-training", out))
    return metrics
