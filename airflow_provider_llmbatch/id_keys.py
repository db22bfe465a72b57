"""
The custom ids of a whole input, as 8-byte keys: which ids are used more than once, in flat memory.

An input split into many files must have each custom id once over all of them. Keeping the ids would
take memory in proportion to the input; a key per id takes 8 bytes. A repeated key means a repeated id
or (about once in 10^7 million-id inputs) two ids sharing a key, which the caller tells apart by naming
the repeated ids in a second pass.
"""

from __future__ import annotations

import itertools
from array import array

_BUCKET_SHIFT = 58
"""Keys are put in buckets by their top 6 bits (:meth:`IdKeys.repeated`)."""
_BUCKETS = 1 << (64 - _BUCKET_SHIFT)


def id_key(custom_id: str) -> int:
    """
    Return the 64-bit key of a custom id (signed): its string hash (SipHash), computed in C.

    The same within one process (string hashes are salted per process), which is all one pass and its
    naming of the repeated ids need; a key never leaves the process.
    """
    return hash(custom_id)


class IdKeys:
    """The keys of the custom ids seen so far, in order (8 bytes each)."""

    __slots__ = ("_keys", "_repeated")

    def __init__(self) -> None:
        self._keys: array[int] = array("q")
        self._repeated: set[int] | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, custom_id: str) -> None:
        """Add one id."""
        self._keys.append(id_key(custom_id))

    def add_all(self, custom_ids: list[str]) -> None:
        """Add ids in order (the keys of :func:`id_key`, computed for all of them at once)."""
        self._keys.extend(map(hash, custom_ids))

    def repeated(self) -> set[int]:
        """Return the keys added more than once."""
        if self._repeated is None:
            # A bucket at a time (by the top bits): a set or a sort of the whole table would hold a
            # Python int per id (about 40 MB a million); the table itself holds 8 bytes per id. A signed
            # key's top bits are -32 to 31, a list index from either end.
            buckets: list[array[int]] = [array("q") for _ in range(_BUCKETS)]
            for key in self._keys:
                buckets[key >> _BUCKET_SHIFT].append(key)
            self._repeated = set()
            for bucket in buckets:
                if len(set(bucket)) < len(bucket):
                    ordered = sorted(bucket)
                    self._repeated.update(a for a, b in itertools.pairwise(ordered) if a == b)
        return self._repeated
