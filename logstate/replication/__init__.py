"""Replication of a store to NATS JetStream: the changelog, snapshots, restore."""

__all__: list[str] = []
