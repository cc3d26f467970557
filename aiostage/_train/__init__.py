"""Checkpointing a training loop: model/optimizer state and the checkpoint manager."""
