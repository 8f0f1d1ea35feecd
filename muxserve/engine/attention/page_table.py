"""Per-request page tables kept on the device and grown incrementally.

Every running request gets a *slot*: a row of ``table`` (S, max_blocks, L*H) int32 that holds
its page ids in block-major order (``table[slot, b, l*H + h]`` = page of token block b, layer l,
kv-head h), exactly the request's flat page list viewed as (blocks, L*H). A step converts only
the pages that appeared since the last step (a new block every ``page_tokens`` tokens), in one
host-to-device copy for the whole batch, instead of rebuilding every table from Python lists.

A request is known by its key (its id). Its page list is trusted to only grow while it is the
same list object; a different object, a shorter list or a changed last page (preemption and
recompute, a re-sent table) resets the row. ``release`` frees slots of finished requests; when
slots run out, rows of requests that are not in the current batch are reclaimed first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from muxserve.engine.kv_cache import KVLayout


@dataclass
class _Entry:
    slot: int
    pages: list[int]  # the request's own list (identity checked)
    blocks: int = 0  # whole blocks already in the table
    last: int = -1  # the last page converted, to detect a rewritten list


class PageTables:
    """Slot page tables of one model on one device."""

    def __init__(self, layout: KVLayout, device: torch.device, num_slots: int = 8, max_blocks: int = 16,
                 max_table_bytes: int = 64 * 1024 * 1024):
        self.layout = layout
        self.device = torch.device(device)
        self.pages_per_block = layout.pages_per_block
        self.max_table_bytes = max_table_bytes
        self.table = torch.zeros(max(1, num_slots), max(1, max_blocks), self.pages_per_block, dtype=torch.int32,
                                 device=self.device)
        self._entries: dict[str, _Entry] = {}
        self._free: list[int] = list(range(self.table.shape[0] - 1, -1, -1))
        self.version = 0  # bumped whenever ``table`` is reallocated (CUDA graphs hold its address)
        self._pin = self.device.type == "cuda"

    @classmethod
    def for_limits(cls, layout: KVLayout, device: torch.device, max_seqs: int, max_tokens: int,
                   max_table_bytes: int = 64 * 1024 * 1024) -> PageTables:
        """Size the table for ``max_seqs`` requests of ``max_tokens`` tokens, within a byte budget."""
        blocks = layout.num_blocks(max(1, max_tokens))
        row_bytes = blocks * layout.pages_per_block * 4
        slots = max(1, min(max_seqs, max_table_bytes // max(row_bytes, 1)))
        if slots < max_seqs:  # too big for every slot at full length: start short, grow on demand
            slots = max_seqs
            blocks = max(1, min(blocks, max_table_bytes // (slots * layout.pages_per_block * 4)))
        return cls(layout, device, slots, blocks, max_table_bytes)

    @property
    def num_slots(self) -> int:
        return self.table.shape[0]

    @property
    def max_blocks(self) -> int:
        return self.table.shape[1]

    def slot_of(self, key: str) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.slot

    def release(self, keys) -> None:
        """Forget finished or aborted requests; their slots are reused."""
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._free.append(entry.slot)

    def update(self, keys: list[str], page_lists: list[list[int]], num_blocks: list[int]) -> list[int]:
        """Bring the rows of one batch up to date; return each request's slot.

        ``num_blocks[i]``: token blocks request i needs in this step; its page list must hold
        at least ``num_blocks[i] * L * H`` pages. A request whose list is the same object, did not
        need a new block and still ends its converted part with the same page costs a few
        comparisons and no device work (the usual decode step: a new block every ``page_tokens``).
        """
        ppb = self.pages_per_block
        if max(num_blocks, default=0) > self.max_blocks:
            self._grow(self.num_slots, max(max(num_blocks), 2 * self.max_blocks))
        batch = set(keys)
        if len(batch) != len(keys):
            raise ValueError("duplicate request ids in one batch")
        slots: list[int] = []
        changed: list[tuple[_Entry, list[int], int, bool]] = []  # (entry, pages, blocks needed, reset)
        entries = self._entries
        for key, pages, nb in zip(keys, page_lists, num_blocks):
            entry = entries.get(key)
            if entry is not None and entry.pages is pages and nb <= entry.blocks:
                # Unchanged: the converted prefix is intact if the list still reaches its last page.
                stop = entry.blocks * ppb
                if len(pages) >= stop > 0 and pages[stop - 1] == entry.last:
                    slots.append(entry.slot)
                    continue
            if len(pages) < nb * ppb:
                raise RuntimeError(f"sequence {key} holds {len(pages)} pages, needs {nb * ppb}")
            reset = False
            if entry is None:
                entry = _Entry(self._take_slot(batch), pages)
                entries[key] = entry
                reset = True
            elif entry.pages is not pages or len(pages) < entry.blocks * ppb or (
                    entry.blocks and pages[entry.blocks * ppb - 1] != entry.last):
                entry.pages, entry.blocks, entry.last = pages, 0, -1
                reset = True
            changed.append((entry, pages, nb, reset))
            slots.append(entry.slot)
        if changed:
            self._write(changed)
        return slots

    def _write(self, changed) -> None:
        """Zero the rows of new or reset requests, then copy every new block, one transfer each."""
        ppb = self.pages_per_block
        zero = [entry.slot for entry, _, _, reset in changed if reset]
        new_values: list[int] = []
        dest_rows: list[int] = []
        for entry, pages, nb, _ in changed:
            if nb > entry.blocks:
                start, stop = entry.blocks * ppb, nb * ppb
                new_values.extend(pages[start:stop])
                base = entry.slot * self.max_blocks
                dest_rows.extend(range(base + entry.blocks, base + nb))
                entry.blocks, entry.last = nb, pages[stop - 1]
        if zero:
            self.table.index_fill_(0, self._to_device(zero, np.int64), 0)
        if dest_rows:
            values = self._to_device(new_values, np.int32).view(-1, ppb)
            self.table.view(-1, ppb).index_copy_(0, self._to_device(dest_rows, np.int64), values)

    def gather(self, slots: list[int], num_blocks: int) -> torch.Tensor:
        """(B, num_blocks, L, H) int64 tables of the given slots (zero past each request's blocks)."""
        index = torch.tensor(slots, dtype=torch.int64, device=self.device)
        tables = self.table[index, :num_blocks]  # (B, MB, L*H)
        return tables.view(len(slots), num_blocks, self.layout.num_layers, self.layout.num_kv_heads).long()

    # -- internals -----------------------------------------------------------------------------
    def _to_device(self, values: list[int], dtype) -> torch.Tensor:
        # numpy converts a list of ints several times faster than torch.tensor (thousands of
        # page ids when a large batch crosses a block boundary together).
        host = torch.from_numpy(np.array(values, dtype=dtype))
        if self.device.type == "cpu":
            return host
        if self._pin:
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _take_slot(self, batch: set[str]) -> int:
        if not self._free:
            stale = [k for k in self._entries if k not in batch]
            if stale:  # reclaim rows of requests that are not running now (never told finished)
                self.release(stale)
            else:
                self._grow(2 * self.num_slots, self.max_blocks)
        return self._free.pop()

    def _grow(self, num_slots: int, max_blocks: int) -> None:
        old = self.table
        table = torch.zeros(num_slots, max_blocks, self.pages_per_block, dtype=torch.int32, device=self.device)
        table[: old.shape[0], : old.shape[1]] = old
        self._free.extend(range(num_slots - 1, old.shape[0] - 1, -1))
        self._free.sort(reverse=True)
        self.table = table
        self.version += 1
