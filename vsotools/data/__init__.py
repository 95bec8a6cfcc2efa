"""Data for training: the vocabulary and word vectors (``vocab``), the streaming shard loader
(``loader``)."""
