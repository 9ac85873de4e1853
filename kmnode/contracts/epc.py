"""The modelled enclave memory of the internal cache: which pages each cache access touches,
and which of those an SGX enclave would have to swap in (issue 14, S4).

Why model it: SGX keeps enclave memory in a small protected region (the EPC) and, when the
enclave outgrows it, pages it out encrypted; touching a page that is out costs a swap, about
40,000 cycles (measured for SGX). A cache that outgrows the EPC so pays for its size, which is
the cliff the benchmark shows. This process is no enclave, so the cost is modelled, and the
model is deterministic (no ``hash()``, no clock, no address of a Python object): the same
cache operations give the same counts on every node and in every run.

Two parts:

* ``EpcModel``: the EPC as an LRU set of resident page ids, ``budget_bytes // page_bytes`` of
  them. Touching a resident page costs nothing (it becomes the most recently used); touching
  any other page is a fault that costs ``swap_cycles`` and makes it resident, evicting the
  least recently used page if the set is full. A first touch is a fault too: the page was never
  in, so a working set within the budget pays once per page and never again. LRU is what the
  SGX driver approximates (its reclaimer ages pages by their accessed bits).
* ``TableLayout``: the cache's hash table laid out as a native (C or Rust) enclave would lay it
  out, so each cache operation touches the pages it would touch. Addresses, from 0:

  - **the table header**, page 0: the LRU list's front and back, the dirty list's head, the
    entry count, and the allocator's bump pointer and free-list heads (272 size classes, below:
    2.1 KiB of heads). Every LRU relink and every allocation touches it; so hot, it stays
    resident.
  - **the bucket array**, from page 1: one 8-byte chain head per bucket, as many buckets as the
    next power of two at or above ``max_entries`` (load factor at most 1, a mask for an index,
    and never resized, since the bound is fixed). The bucket of an entry is a BLAKE2b of its
    contract and key (deterministic on every node).
  - **the heap**, from the first page after the bucket array: one node per entry, its header
    and then its key and value bytes. The header is a C struct of 52 bytes of fields, padded
    to 56 for its 8-byte members: the key's hash (8, compared before the key), the chain's next
    (8), the LRU list's newer and older (16), the dirty list's next (8, so a write-back walks
    the dirty entries without scanning the table), the contract's index (4: contracts are
    numbered in the enclave, the name is not repeated per entry), the key's length (2: keys
    are at most 256 bytes), the value's length (4: values are at most 64 KiB) and flags (2:
    dirty, absent). No version: the versions seen are the verified backing's, not the cache's.
  - **the allocator**: a node takes ``NODE_HEADER_BYTES + len(key) + len(value)`` rounded up
    to 16 bytes (the alignment malloc gives on x86-64) up to a page, to whole pages above. A
    freed node goes onto its size class's free list (LIFO, its first 8 bytes the link, no
    coalescing); an allocation takes the head of its class's list, or bumps the pointer. So a
    node never moves while it lives (a pointer to it stays valid), a freed slot is reused, and
    nodes are packed back to back and may straddle a page boundary (as with dlmalloc, the SGX
    SDK's allocator).

  What each operation touches (header: the pages of a node's first ``NODE_HEADER_BYTES``;
  node: the pages of all its bytes):

  - a lookup: the bucket's head, then the header of each chain node from the head until the
    key (all of them for a key not cached); new nodes go to the chain's head;
  - a hit: the lookup, the node (its value is read), and the move to the LRU front unless it is
    there already: the header of both old neighbours (relinked to each other), of the old front
    (its newer becomes this node) and the table header;
  - caching a loaded value: the lookup of the miss, the allocation (table header; a reused
    slot's link), the new node (written), the bucket's head, the old front and the table
    header;
  - a committed write: the lookup, then the node (rewritten in place if its size class is
    unchanged) and the move to the front; a write that changes the size class frees the node
    and allocates another, as an eviction and an insert would;
  - a write-back: the table header (the dirty list's head) and each dirty node (its value is
    read to seal it and its flag cleared);
  - an eviction: the header of every node the walk from the LRU back visits (dirty ones are
    skipped but read), then per victim its header, the bucket's head and the headers of the
    chain nodes before it (to unlink it), its LRU neighbours' headers, the table header and
    its first 8 bytes (the free list's link);
  - a drop: the table header and the whole bucket array (cleared); the heap is reset to empty.

  Not modelled: the VM, its code and linear memory, the call's overlay, stacks and the rest of
  the enclave (the budget is the cache's share of the EPC); the CPU caches and TLB (a page
  that is in costs nothing); the cost of hashing and comparing; sorting the dirty keys for a
  write-back (scratch memory).

Nothing here sees a value; a slot's key is kept (to follow the chain and LRU links) but never
shown: the reprs give counts only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

#: The EPC page (SGX pages are 4 KiB).
PAGE_BYTES = 4096
#: What swapping one page in costs, as measured for SGX (the fault, the exit from and return
#: to the enclave, writing the victim out encrypted and loading the page back).
SWAP_CYCLES = 40_000
#: A node's header: 52 bytes of fields padded to 8-byte alignment (see the module docstring).
NODE_HEADER_BYTES = 56
#: One chain head in the bucket array.
BUCKET_BYTES = 8
#: Small nodes are rounded up to this (malloc's alignment on x86-64); larger than a page, to
#: whole pages.
ALIGN_BYTES = 16

#: A cache entry's identity: (contract, storage key).
Slot = tuple[str, bytes]


class EpcModelError(ValueError):
    """An ``EpcModel`` or ``TableLayout`` asked for with a size out of range."""


class EpcModel:
    """The EPC as an LRU set of resident pages: ``touch`` charges a swap for a page that is not
    in (see the module docstring)."""

    __slots__ = ("_resident", "capacity", "faults", "page_bytes", "swap_cycles", "touches")

    def __init__(
        self, budget_bytes: int, swap_cycles: int = SWAP_CYCLES, page_bytes: int = PAGE_BYTES
    ) -> None:
        if budget_bytes < 0 or swap_cycles < 0 or page_bytes < 1:
            raise EpcModelError(
                "the budget and swap cost must be 0 or more and the page 1 byte or more"
            )
        self.page_bytes = page_bytes
        self.swap_cycles = swap_cycles
        #: How many pages fit in the budget (0: none, every touch faults).
        self.capacity = budget_bytes // page_bytes
        #: Touches of a page that was not resident, and touches in all.
        self.faults = 0
        self.touches = 0
        self._resident: OrderedDict[int, None] = OrderedDict()

    @property
    def cycles(self) -> int:
        """The swap cycles charged so far."""
        return self.faults * self.swap_cycles

    @property
    def resident_pages(self) -> int:
        return len(self._resident)

    def is_resident(self, page: int) -> bool:
        return page in self._resident

    def touch(self, page: int) -> int:
        """Access ``page``: the cycles it cost (0 if it was resident, else ``swap_cycles``)."""
        self.touches += 1
        resident = self._resident
        if page in resident:
            resident.move_to_end(page)
            return 0
        self.faults += 1
        if self.capacity:
            if len(resident) >= self.capacity:
                resident.popitem(last=False)
            resident[page] = None
        return self.swap_cycles

    def touch_bytes(self, address: int, length: int) -> int:
        """Access ``length`` bytes from ``address`` (at least one): every page they span."""
        page = self.page_bytes
        first = address // page
        return sum(self.touch(p) for p in range(first, (address + max(length, 1) - 1) // page + 1))

    def __repr__(self) -> str:
        return (
            f"EpcModel(resident={len(self._resident)}/{self.capacity} pages, "
            f"faults={self.faults}/{self.touches})"
        )


def bucket_count(max_entries: int) -> int:
    """The bucket array's length: the next power of two at or above ``max_entries``."""
    return 1 << max(0, max_entries - 1).bit_length()


def heap_start(max_entries: int, page_bytes: int = PAGE_BYTES) -> int:
    """Where the heap begins: the first page after the table header and the bucket array."""
    buckets = bucket_count(max_entries) * BUCKET_BYTES
    return page_bytes + -(-buckets // page_bytes) * page_bytes


def node_bytes(entry_bytes: int, page_bytes: int = PAGE_BYTES) -> int:
    """What the allocator gives an entry of ``entry_bytes`` (key + value): header included,
    rounded up to its size class."""
    used = NODE_HEADER_BYTES + entry_bytes
    unit = ALIGN_BYTES if used <= page_bytes else page_bytes
    return -(-used // unit) * unit


def footprint_bytes(
    max_entries: int, entry_sizes: Iterable[int], page_bytes: int = PAGE_BYTES
) -> int:
    """The enclave memory a table spans once it holds entries of these sizes (key + value),
    allocated one after another with nothing freed: the whole pages up to the bump pointer."""
    end = heap_start(max_entries, page_bytes) + sum(node_bytes(s, page_bytes) for s in entry_sizes)
    return -(-end // page_bytes) * page_bytes


@dataclass(slots=True)
class _Node:
    """One entry's node: where it is, its size class, and the pages its header and its used
    bytes span (kept so a touch needs no arithmetic), and its LRU links."""

    address: int
    allocated: int
    bucket: int
    first: int = 0
    header_last: int = 0
    last: int = 0
    newer: Slot | None = None
    older: Slot | None = None

    def place(self, used: int, page_bytes: int) -> None:
        self.first = self.address // page_bytes
        self.header_last = (self.address + NODE_HEADER_BYTES - 1) // page_bytes
        self.last = (self.address + used - 1) // page_bytes

    def __repr__(self) -> str:
        return f"_Node(address={self.address}, allocated={self.allocated})"


class TableLayout:
    """The cache's hash table in modelled enclave memory: the cache tells it what it does to
    which entry, and it touches the pages a native table would (see the module docstring).

    It keeps the entries' order as the cache's LRU does (front: most recently used); the cache
    must report every insert, access, write and removal, in order. The node of a cached key is
    found through a dict (what the model costs is not what it models), and then charged the
    pages the walk from its bucket would have touched.
    """

    def __init__(self, max_entries: int, epc: EpcModel) -> None:
        if max_entries < 1:
            raise EpcModelError("a table has room for at least one entry")
        self._epc = epc
        self._touch = epc.touch
        self._page = epc.page_bytes
        self._mask = bucket_count(max_entries) - 1
        self._heap = heap_start(max_entries, self._page)
        self._bump = self._heap
        self._free: dict[int, list[int]] = {}
        self._nodes: dict[Slot, _Node] = {}
        self._chains: dict[int, list[Slot]] = {}  # each chain's head last
        self._front: Slot | None = None
        self._back: Slot | None = None

    @property
    def epc(self) -> EpcModel:
        return self._epc

    @property
    def footprint_bytes(self) -> int:
        """The enclave memory the table spans: the whole pages up to the heap's bump pointer."""
        return -(-self._bump // self._page) * self._page

    def __len__(self) -> int:
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"TableLayout(entries={len(self._nodes)}, footprint={self.footprint_bytes})"

    def order(self) -> list[Slot]:
        """The entries from the least to the most recently used (for tests: it must be the
        cache's LRU order)."""
        out: list[Slot] = []
        slot = self._back
        while slot is not None:
            out.append(slot)
            slot = self._nodes[slot].newer
        return out

    # What the cache reports.

    def hit(self, slot: Slot) -> None:
        """A read of a cached entry: the lookup, its value, the move to the LRU front."""
        node = self._find(slot)
        self._touch_node(node)
        if self._front != slot:
            self._to_front(slot, node)

    def miss(self, slot: Slot) -> None:
        """A lookup of a key that is not cached: its bucket's whole chain is walked."""
        bucket = self._bucket(slot)
        self._touch_bucket(bucket)
        for other in reversed(self._chains.get(bucket, ())):
            self._touch_header(self._nodes[other])

    def insert(self, slot: Slot, entry_bytes: int) -> None:
        """A new entry (after its ``miss``): allocated, written, at its chain's head and at
        the LRU front."""
        bucket = self._bucket(slot)
        node = self._allocate(entry_bytes, bucket)
        self._touch_node(node)
        self._touch_bucket(bucket)
        self._chains.setdefault(bucket, []).append(slot)
        self._nodes[slot] = node
        self._push_front(slot, node)

    def write(self, slot: Slot, entry_bytes: int) -> None:
        """A committed write: in place if the size class holds, else a new node; at the front."""
        node = self._nodes.get(slot)
        if node is None:
            self.miss(slot)
            self.insert(slot, entry_bytes)
            return
        self._find(slot)
        if node_bytes(entry_bytes, self._page) != node.allocated:
            self.remove(slot)
            self.insert(slot, entry_bytes)
            return
        node.place(NODE_HEADER_BYTES + entry_bytes, self._page)
        self._touch_node(node)
        if self._front != slot:
            self._to_front(slot, node)

    def write_back(self, slots: Iterable[Slot]) -> None:
        """A write-back reads these dirty entries (to seal them) and clears their flags."""
        self._touch(0)
        for slot in slots:
            self._touch_node(self._nodes[slot])

    def scan(self, slots: Iterable[Slot]) -> None:
        """The eviction walk from the LRU back visited these entries' headers."""
        self._touch(0)
        for slot in slots:
            self._touch_header(self._nodes[slot])

    def remove(self, slot: Slot) -> None:
        """An entry leaves: unlinked from its chain and the LRU list, its node freed."""
        node = self._nodes[slot]
        self._touch_header(node)
        self._touch_bucket(node.bucket)
        chain = self._chains[node.bucket]
        at = chain.index(slot)
        for before in reversed(chain[at + 1 :]):  # from the head to its predecessor
            self._touch_header(self._nodes[before])
        del chain[at]
        if not chain:
            del self._chains[node.bucket]
        self._unlink(node)
        del self._nodes[slot]
        self._touch(0)
        self._touch(node.first)  # the free list's link, in its first 8 bytes
        self._free.setdefault(node.allocated, []).append(node.address)

    def clear(self) -> None:
        """Every entry goes at once: the bucket array is cleared and the heap reset."""
        self._touch(0)
        self._epc.touch_bytes(self._page, (self._mask + 1) * BUCKET_BYTES)
        self._bump = self._heap
        self._free.clear()
        self._nodes.clear()
        self._chains.clear()
        self._front = self._back = None

    # The table's memory.

    def _touch_header(self, node: _Node) -> None:
        self._touch(node.first)
        if node.header_last != node.first:
            self._touch(node.header_last)

    def _touch_node(self, node: _Node) -> None:
        touch = self._touch
        touch(node.first)
        for page in range(node.first + 1, node.last + 1):
            touch(page)

    def _touch_bucket(self, bucket: int) -> None:
        self._touch((self._page + bucket * BUCKET_BYTES) // self._page)

    def _bucket(self, slot: Slot) -> int:
        digest = hashlib.blake2b(slot[0].encode() + b"\0" + slot[1], digest_size=8).digest()
        return int.from_bytes(digest, "little") & self._mask

    def _find(self, slot: Slot) -> _Node:
        """A cached entry's lookup: its bucket's head, and the chain's headers from the head
        to its own."""
        node = self._nodes.get(slot)
        if node is None:
            raise KeyError("the layout has no such entry: the cache did not report it")
        self._touch_bucket(node.bucket)
        chain = self._chains[node.bucket]
        if chain[-1] == slot:
            self._touch_header(node)
        else:
            for other in chain[chain.index(slot) :][::-1]:
                self._touch_header(self._nodes[other])
        return node

    def _allocate(self, entry_bytes: int, bucket: int) -> _Node:
        allocated = node_bytes(entry_bytes, self._page)
        self._touch(0)
        free = self._free.get(allocated)
        if free:
            address = free.pop()
            self._touch(address // self._page)  # the next free slot's link, its first bytes
        else:
            address = self._bump
            self._bump += allocated
        node = _Node(address, allocated, bucket)
        node.place(NODE_HEADER_BYTES + entry_bytes, self._page)
        return node

    def _to_front(self, slot: Slot, node: _Node) -> None:
        self._unlink(node)
        self._push_front(slot, node)

    def _unlink(self, node: _Node) -> None:
        newer, older = node.newer, node.older
        if newer is None or older is None:
            self._touch(0)  # it was the front or the back
        if newer is None:
            self._front = older
        else:
            neighbour = self._nodes[newer]
            self._touch_header(neighbour)
            neighbour.older = older
        if older is None:
            self._back = newer
        else:
            neighbour = self._nodes[older]
            self._touch_header(neighbour)
            neighbour.newer = newer
        node.newer = node.older = None

    def _push_front(self, slot: Slot, node: _Node) -> None:
        self._touch(0)
        old = self._front
        node.newer, node.older = None, old
        if old is None:
            self._back = slot
        else:
            front = self._nodes[old]
            self._touch_header(front)
            front.newer = slot
        self._front = slot


__all__ = [
    "NODE_HEADER_BYTES",
    "PAGE_BYTES",
    "SWAP_CYCLES",
    "EpcModel",
    "EpcModelError",
    "Slot",
    "TableLayout",
    "bucket_count",
    "footprint_bytes",
    "heap_start",
    "node_bytes",
]
