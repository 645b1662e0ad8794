"""The engine core's batch: persistent slots, one row of parallel arrays each, and the recurrent state.

A stream that is admitted takes the lowest free slot and keeps it until it
ends: a leaving row is freed in place and a joining one fills a free slot, so
most steps move no state at all. The decode step runs over slots
[0, ``extent``); free slots inside it compute a row nobody reads. The extent
grows when a slot past it is taken and shrinks by compaction, which moves the
highest rows into the lowest holes: on the CPU as soon as holes are left after
the joins of a round (a hole costs a whole row of compute every step), on CUDA
once they are a quarter of the extent (a row costs little there, a move a kernel
launch), with the extent rounded up to a multiple of ``BUCKET``; with CUDA graphs
(--cuda-graphs on), to one of the captured sizes, ``BUCKET`` doubled until the
capacity (``sizes``: each size holds buffers and graphs of its own on the card,
so there are few of them, and a padded row costs little there).

Per-slot arrays are indexed by slot; ``State`` is the model's ``(h,)`` or
``(h, c)``, each [layers, extent, hidden].
"""

from __future__ import annotations

import heapq

import numpy as np

from charrnn.service.runtime import LoadedModel, State

BUCKET = 64  # CUDA extents are multiples of this (fewer shapes, room to join without moving state)


def captured_extents(capacity: int) -> list[int]:
    """The extents of a batch of ``capacity`` slots with CUDA graphs (Slots.sizes): BUCKET, 2 BUCKET,
    4 BUCKET, ..., and the capacity itself the largest."""
    sizes, size = [], BUCKET
    while size < capacity:
        sizes.append(size)
        size *= 2
    return sizes + [capacity]


class Slots:
    # name -> dtype of each per-slot array (reset when a slot is taken)
    FIELDS = {
        "fe": np.int16,  # front-end that owns the stream
        "row": np.int32,  # the stream's row at that front-end
        "active": np.bool_,  # decoding (prefilling streams hold a slot but are not active yet)
        "token": np.int64,  # next input of the step
        "temperature": np.float32,
        "top_k": np.int64,
        "top_p": np.float32,
        "seed": np.uint64,
        "generated": np.int64,  # characters generated so far (= the next draw number)
        "limit": np.int64,  # max_chars
        "deadline": np.float64,  # time.monotonic() by which it must end; inf when none
        "cancelled": np.bool_,
        "cancelled_at": np.int64,  # the batch's step count when the cancel arrived
        "arrived": np.float64,
        "admitted_at": np.float64,
        "first_at": np.float64,
        "last_at": np.float64,  # time of the stream's latest character
        "serial": np.int64,  # which stream holds the slot: a number no other stream of this batch had
    }

    def __init__(self, model: LoadedModel, capacity: int):
        self.model = model
        self.capacity = capacity
        self.arrays = {name: np.zeros(capacity, dtype) for name, dtype in self.FIELDS.items()}
        for name, array in self.arrays.items():  # s.token is s.arrays["token"]: filled in place, never replaced
            setattr(self, name, array)
        self._free = list(range(capacity))  # a heap: the lowest free slot first
        self._serials = 0
        self.used = 0  # slots taken (prefilling + active)
        self.extent = 0
        self.state: State | None = None
        self.on_device = model.device_path  # CUDA's extents (and the device path's dry run on the CPU)
        self.sizes: list[int] | None = None  # the extents allowed, when only some are (CUDA graphs: Batch.prepare)

    # ---- taking and freeing ----

    def allocate(self, n: int) -> np.ndarray:
        """The ``n`` lowest free slots, reset: int64 [n]; raises IndexError when fewer are free."""
        if n > len(self._free):
            raise IndexError(f"{n} slots wanted, {len(self._free)} free")
        slots = np.array([heapq.heappop(self._free) for _ in range(n)], np.int64)
        for array in self.arrays.values():
            array[slots] = 0
        self.deadline[slots] = np.inf
        self.serial[slots] = np.arange(self._serials + 1, self._serials + n + 1)
        self._serials += n
        self.used += n
        return slots

    def free(self, slots: np.ndarray) -> None:
        """Frees ``slots`` in place (their state rows are left as they are: nobody reads them)."""
        active = self.arrays["active"]
        for slot in slots.tolist():
            active[slot] = False
            heapq.heappush(self._free, slot)
        self.used -= len(slots)

    @property
    def free_count(self) -> int:
        return self.capacity - self.used

    def active_rows(self) -> np.ndarray | slice:
        """The slots decoding now, ascending: int64 [n], or the slice [0, extent) when that is all of them
        (the usual case, and indexing by a slice is a view, not a gather)."""
        active = self.active[: self.extent]
        n = int(np.count_nonzero(active))
        return slice(0, self.extent) if n == self.extent else np.flatnonzero(active)

    # ---- state ----

    def place(self, slots: np.ndarray, state: State) -> None:
        """Writes ``state`` (batch k) into ``slots`` (int64 [k]), growing the extent to hold them."""
        need = int(slots.max()) + 1
        if need > self.extent:
            self._resize(self._round(need))
        self.state = self.model.place(self.state, slots, state)

    def _round(self, extent: int) -> int:
        if self.sizes is not None:
            return next(size for size in self.sizes if size >= extent)
        return min(self.capacity, -(-extent // BUCKET) * BUCKET) if self.on_device else extent

    def _resize(self, extent: int) -> None:
        if self.state is None:
            self.state = self.model.zero_state(extent)
        else:
            self.state = self.model.resize(self.state, extent)
        self.extent = extent

    def compact(self) -> tuple[list[int], list[int]]:
        """Moves the highest used slots into the lowest holes and shrinks the extent, when the holes cost
        more than the move (see the module docstring). Call it only while no stream is prefilling: the
        slots it moves must all be decoding ones, whose every record is in these arrays. Returns the
        slots moved and where to: (from, to)."""
        if self.used == 0:
            self.state, self.extent = None, 0
            return [], []
        target = self._round(self.used)
        holes = self.extent - self.used
        if target >= self.extent or (self.on_device and holes * 4 < self.extent):
            return [], []
        used = np.zeros(self.capacity, bool)
        used[: self.extent] = self.arrays["active"][: self.extent]
        movers = np.flatnonzero(used[target:]) + target  # rows past the new extent...
        holes_below = np.flatnonzero(~used[:target])[: len(movers)]  # ...into the lowest holes
        if len(movers):
            self.state = self.model.place(self.state, holes_below, self.model.gather(self.state, movers))
            for array in self.arrays.values():
                array[holes_below] = array[movers]
            used[holes_below] = True
            used[movers] = False
            self.arrays["active"][movers] = False
        self.state = self.model.resize(self.state, target)
        self.extent = target
        self._free = np.flatnonzero(~used).tolist()  # ascending: already a heap
        return movers.tolist(), holes_below.tolist()
