"""Step 3: the shard set's format, and writing and verifying shard sets."""
