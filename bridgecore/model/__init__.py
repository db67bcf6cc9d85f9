"""The model floor: loading, images, prompts, extraction, the bridge, the edit pipelines, tensor formats."""
