"""Loading checkpoints: ``load`` and record verification."""
