"""What both loaders (code shards, and images for tokenizer training) do with data they cannot
read: a file or shard that raises OSError is tried again after each of ``READ_RETRY_DELAYS_S``
(hiccups of network storage), and data that stays unreadable is counted as bad, or, under
``data.bad_data: fail`` (or beyond ``data.max_bad_fraction``), raises :class:`BadDataError`."""

from __future__ import annotations

# Waits before the 2nd, 3rd, ... try of a file or shard that raised OSError: 4 tries over 7.5 s;
# a longer outage makes its samples bad. Looked up at each read, so tests can shorten it.
READ_RETRY_DELAYS_S: tuple[float, ...] = (0.5, 2.0, 5.0)


class BadDataError(RuntimeError):
    """A shard, sample or image is unreadable and the policy is ``fail`` (or too much data is bad)."""
