"""The code-shard format, in one home: the sample encoding (:mod:`.format`), the fast tar
reader (:mod:`.tar_reader`) and the split manifest (:mod:`.manifest`). ``data_prep`` writes
it, the loader and ``verify-shards`` read it."""
