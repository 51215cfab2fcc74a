"""Per-worker training loops (Ray-free; ``pipelines/train_harness.py`` runs them on Ray Train)."""
