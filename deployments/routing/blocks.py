"""Token-block prefix hashes and the table of which replica saw which block.

vLLM's prefix cache holds a prompt's KV in blocks of tokens, each keyed by the hash of the
block's tokens and of everything before it. The router keys on the same thing, on the token ids
the model replica receives (not on characters: two texts that tokenize differently share no
cache): block `i`'s hash covers tokens `0 .. (i+1)*block_tokens`, so a matching block `i` means
the whole prefix up to it matches.

Invariants:

* hashes are the same in every process (integers and tuples of integers hash without Python's
  per-process string salt), so every ingress replica computes the same keys;
* the table is bounded (`max_blocks`, least recently used first out) and only ever a hint: a
  replica may have evicted a block the table still names, and a block the table has forgotten
  costs one cache miss, never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

BRANCHED = -1  # `PrefixTable._next`: prompts went on differently after this block


def block_hashes(token_ids: Sequence[int], block_tokens: int) -> list[int]:
    """The chained hash of every full block of `block_tokens` tokens (a partial last block is
    not cached by vLLM either)."""
    out: list[int] = []
    h = 0
    for end in range(block_tokens, len(token_ids) + 1, block_tokens):
        h = hash((h, tuple(token_ids[end - block_tokens : end])))
        out.append(h)
    return out


class PrefixTable:
    """Block hash → the replicas that were sent a prompt holding that block, as a bit mask over
    replica slots (`slot`), most recently used last; and whether different prompts went on
    differently after the block (a branch: the end of a prefix many prompts share, such as a
    system prompt, where each conversation's own blocks begin)."""

    def __init__(self, max_blocks: int):
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[int, int] = OrderedDict()
        self._next: dict[int, int] = {}  # block → the block that followed it, or BRANCHED
        self._slots: dict[str, int] = {}  # replica id → bit index
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._blocks)

    def slot(self, replica: str) -> int:
        """The replica's bit (allocated on first use; a removed replica's bit is reused)."""
        bit = self._slots.get(replica)
        if bit is None:
            bit = self._free.pop() if self._free else len(self._slots)
            self._slots[replica] = bit
        return bit

    def mask(self, replicas: Sequence[str]) -> int:
        m = 0
        for r in replicas:
            m |= 1 << self.slot(r)
        return m

    def match(self, hashes: Sequence[int], among: int) -> tuple[int, int]:
        """(number of leading blocks some replica in the mask `among` saw, the mask of those
        replicas that saw all of them). (0, 0): none saw the first block."""
        depth, holders = 0, 0
        for h in hashes:
            m = self._blocks.get(h, 0) & among
            if not m:
                break
            depth, holders = depth + 1, m
            self._blocks.move_to_end(h)
        return depth, holders

    def shared(self, hashes: Sequence[int], depth: int) -> int:
        """How many of the first `depth` blocks are a prefix other prompts went on from
        differently (up to the deepest branch among them): the blocks past it are this
        prompt's own line (a conversation's history)."""
        nxt = self._next
        for i in range(depth - 1, -1, -1):
            if nxt.get(hashes[i]) == BRANCHED:
                return i + 1
        return 0

    def insert(self, hashes: Sequence[int], replica: str) -> None:
        bit = 1 << self.slot(replica)
        blocks, nxt = self._blocks, self._next
        prev = None
        for h in hashes:
            blocks[h] = blocks.get(h, 0) | bit
            blocks.move_to_end(h)
            if prev is not None:
                seen = nxt.get(prev)
                if seen is None:
                    nxt[prev] = h
                elif seen != h:
                    nxt[prev] = BRANCHED
            prev = h
        while len(blocks) > self.max_blocks:
            old, _ = blocks.popitem(last=False)
            nxt.pop(old, None)

    def remove(self, replica: str) -> None:
        """Forget a replica (gone): its bit leaves every block, and is free for a new replica."""
        bit = self._slots.pop(replica, None)
        if bit is None:
            return
        keep = ~(1 << bit)
        for h in list(self._blocks):
            m = self._blocks[h] & keep
            if m:
                self._blocks[h] = m
            else:
                del self._blocks[h]
                self._next.pop(h, None)
        self._free.append(bit)

    def replicas(self, mask: int) -> list[str]:
        return [r for r, bit in self._slots.items() if mask >> bit & 1]
