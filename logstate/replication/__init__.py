"""Replication of a logstate store to a NATS JetStream stream (the ``replication`` extra).

Owns: the public names of replication (filled in as the parts land).
Must never: be imported by the engine tiers below it (they see replication
only through the protocols of ``logstate._hooks``).
"""

from __future__ import annotations

__all__: list[str] = []
