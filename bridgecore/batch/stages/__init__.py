"""One file per stage. A stage is registered by adding it to `pipeline.STAGES`."""
