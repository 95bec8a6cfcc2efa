"""What goes wrong with a shard set: the two errors every module of ``vsotools.shards`` raises."""

from __future__ import annotations

from vsotools.core.errors import VsoError


class ShardSetError(VsoError):
    """A shard set or its manifest is missing or malformed."""


class ShardError(VsoError):
    """The input cannot be sharded, or a shard cannot be read as the manifest says."""
