"""Tiny models, synthetic data and research proofs: imported by nothing in the library."""
