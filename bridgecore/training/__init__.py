"""Training the bridge: the example format and the trainer (imports only the model floor)."""
