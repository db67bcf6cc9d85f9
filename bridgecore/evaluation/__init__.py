"""Capability evaluation: benchmark data, metrics, scores with CIs, the report (imports only the model floor)."""
