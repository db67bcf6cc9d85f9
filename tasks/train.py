"""Task: train the bridge from a manifest or a cache location (GPU). Resumes from the latest checkpoint."""

from prefect import get_run_logger, task

from bridgecore.batch.settings import JobSettings
from bridgecore.batch.training_data import run_training
from bridgecore.training.trainer import TrainConfig


@task(name="train_bridge", result_serializer="json")
def train_bridge_task(data: str, out: str, settings: dict, train_config: dict, bridge_overrides: dict,
                      nproc_per_node: int = 1, shard_size: int | None = None) -> dict:
    metrics = run_training(data, out, JobSettings.from_dict(settings), TrainConfig(**train_config), bridge_overrides,
                           progress=False, nproc_per_node=nproc_per_node,
                           **({"shard_size": shard_size} if shard_size else {}))
    get_run_logger().info("held-out loss %.5f (zero-init bridge) -> %.5f (trained), %.5f with Qwen3 shuffled: "
                          "information gain %+.6f, 95%% CI %s", metrics["heldout_loss_baseline"],
                          metrics["heldout_loss_trained"], metrics["heldout_loss_qwen3_shuffled"],
                          metrics["qwen3_information_gain"], metrics["qwen3_information_gain_ci"])
    return {k: v for k, v in metrics.items() if k != "history"}
