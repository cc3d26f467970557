"""Replication: keep each rank's state on a partner rank, in memory and on disk."""
