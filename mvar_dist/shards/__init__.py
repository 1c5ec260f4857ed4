"""The code-shard format, in one home: the sample encoding and the shard writer (:mod:`.format`),
the fast tar reader (:mod:`.tar_reader`), the split manifest (:mod:`.manifest`), and what
readers do with shards they cannot read (:mod:`.read_errors`, shared with the image loader).
``data_prep`` writes it; the loader, ``verify-shards`` and the trainer read it."""
