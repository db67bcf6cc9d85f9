"""Real-scale planning: sizes, FLOPs, memory and job cost from the real configs (imports only the model floor)."""
