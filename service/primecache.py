"""What reading a prime leaves behind, kept so that the same prime is not read twice.

Reading a prime is deterministic (no sampling), so a stream whose prime was
read before skips its prefill: the state it left is copied into its slot, and
its first character comes from the kept logits of the prime's last character
(or, on CUDA, where the batch step reads that last character, from the step).
Speaker names and the empty prime repeat all the time in char-rnn use, and a
prefill at batch 1 costs several times what a character in the running batch
costs. Used by the engine core's thread and, for the first characters of cached primes, by the core
process's I/O thread (corerun.py); every access to the entries is under the cache's own lock.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

from charrnn.service.runtime import LoadedModel, State


class PrimeCache:
    """(state with batch 1, last logits [V] or None) after reading a prime, by prime, least recently used first out."""

    MAX_PRIME = 1024  # longer primes are not kept (bounds the memory of the keys)

    def __init__(self, capacity: int):
        self.capacity = capacity  # entries; 0 turns the cache off
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[bytes, tuple[State, np.ndarray | None]] = collections.OrderedDict()

    @staticmethod
    def key(prime_ids: np.ndarray) -> bytes:
        return prime_ids.astype(np.int64, copy=False).tobytes()

    def get(self, prime_ids: np.ndarray, count: bool = True) -> tuple[State, np.ndarray | None] | None:
        """The entry of a prime read before, counted as a hit or a miss (None when off: not counted).
        ``count=False``: a look that counts nothing (the core counts the stream when it takes its slot)."""
        if not self.capacity:
            return None
        key = self.key(prime_ids)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            if count:
                self.hits += entry is not None
                self.misses += entry is None
        return entry

    def count_hit(self) -> None:
        with self._lock:
            self.hits += 1

    def put(self, model: LoadedModel, primes: list[np.ndarray], state: State, logits: np.ndarray | None) -> None:
        """Keeps row i of ``state`` and of ``logits`` [k, V] (when given) under ``primes[i]``."""
        if not self.capacity:
            return
        for i, ids in enumerate(primes):
            if len(ids) > self.MAX_PRIME:
                continue
            key = self.key(ids)
            with self._lock:
                if key in self._entries:
                    continue
            entry = (model.gather(state, np.array([i], np.int64)), None if logits is None else logits[i].copy())
            with self._lock:
                self._entries[key] = entry
                if len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
