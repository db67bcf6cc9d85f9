"""One file per stage. A stage is registered in `bridgecore/batch/pipelines.py` (`STAGES` and a `Pipeline`)."""
