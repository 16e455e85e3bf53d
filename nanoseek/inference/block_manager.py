"""The paged latent cache and its block manager (with prefix caching over a hash chain of full blocks).

Memory: one tensor (layers, num_blocks * block_size, r + dr) holding, per token and per layer, only MLA's
normalized latent c (kv_lora_rank = r) and rotated k_pe (qk_rope_head_dim = dr): 576 values per token per layer
for V3 instead of 128 heads x (192 + 128) for full K/V (71x less). MTP layers, when speculation is on, get slots
after the main layers. A sequence owns a block table (list of block ids); token at position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Block 0 is scratch: padded positions of a batch
write there, and it is never handed to a sequence.

Prefix caching: a full block whose tokens are all computed gets hash(parent block's hash, its token ids), so a
block's hash names the whole prefix up to it. A new sequence reuses every leading full block whose hash is
registered (and whose tokens match), skipping their prefill. Freed blocks keep their hash and stay reusable
until they are handed out again, least recently freed first.

Sharing: blocks carry reference counts. n > 1 completions fork from the first one after its prefill and share
all its blocks; the first write into a shared block copies it (copy-on-write), so only the partly filled last
prompt block is ever duplicated.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from nanoseek.inference.sequence import Sequence

SCRATCH_BLOCK = 0


class Block:
    __slots__ = ("id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


class PagedLatentCache:
    """kv: one (num_blocks * block_size, r + dr) tensor per layer, zero-initialized so that padded reads are finite.

    One tensor per layer, not one stacked tensor: a write into a slice of a stacked tensor is, to torch.compile,
    a mutation of a view of the whole cache, and the compiled decode step then copied the entire cache every
    step (15 ms a step at 18M params); writes straight into a layer's own tensor are done in place."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.block_size, self.num_blocks, self.r = block_size, num_blocks, kv_lora_rank
        self.kv = [torch.zeros(num_blocks * block_size, kv_lora_rank + rope_dim, dtype=dtype, device=device)
                   for _ in range(n_layers)]

    def nbytes_per_token(self) -> int:
        """Bytes of cache one token occupies across all layer slots, measured from the allocated tensor."""
        return sum(t.numel() * t.element_size() for t in self.kv) // (self.num_blocks * self.block_size)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: copy every layer's rows of block src into block dst."""
        bs = self.block_size
        for src, dst in pairs:
            for t in self.kv:
                t[dst * bs:(dst + 1) * bs] = t[src * bs:(src + 1) * bs]

    def view(self, slots: torch.Tensor, gather: torch.Tensor) -> "CacheView":
        return CacheView(self.kv, self.r, slots, gather)


class CacheView:
    """What the model's MLA layers see as `cache`: writes the new tokens' latents to their slots, then returns each
    sequence's whole context gathered from its blocks into a padded batch.

    slots (B,T): cache slot of each new token (scratch for padding); gather (B,S): slot of key position j of each
    sequence (scratch beyond its length; the attention mask hides those keys).
    """

    def __init__(self, kv: list[torch.Tensor], r: int, slots: torch.Tensor, gather: torch.Tensor):
        self.kv, self.r = kv, r
        self.slots, self.gather = slots.reshape(-1), gather

    def update(self, layer: int, c: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c (B,T,r), k_pe (B,T,dr) -> all keys c (B,S,r), k_pe (B,S,dr) for `layer`."""
        kv = self.kv[layer]                                                             # (slots, r+dr)
        new = torch.cat([c, k_pe], dim=-1).reshape(-1, kv.shape[-1])                    # (B*T, r+dr)
        kv.index_copy_(0, self.slots, new.to(kv.dtype))
        ctx = kv[self.gather].to(c.dtype)                                               # (B,S,r+dr)
        return ctx[..., : self.r], ctx[..., self.r:]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("the cache needs at least 2 blocks (block 0 is scratch)")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.pending_copies: list[tuple[int, int]] = []     # (src, dst) copy-on-write, done before the forward
        self.prefix_hits = 0                                # tokens served from the prefix cache (stats)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_usable_blocks(self) -> int:
        return len(self.blocks) - 1

    def blocks_for(self, num_slots: int) -> int:
        return -(-num_slots // self.block_size)

    # ----- prefix cache -----
    @staticmethod
    def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Ids of the leading full blocks of seq already in the cache. The block holding the last token is never
        matched: its logits are needed, so at least that token must run through the model."""
        if not self.enable_prefix_caching:
            return []
        bs, found, parent = self.block_size, [], None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = self.chain_hash(parent, tokens)
            block_id = self.hash_to_block.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            found.append(block_id)
        return found

    def commit(self, seq: Sequence) -> None:
        """Register the hash of every full block of seq whose tokens are all computed (called after a step)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(seq.num_hashed_blocks, seq.num_computed // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                parent = self.blocks[seq.block_table[i - 1]].hash if i else None
                block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                block.hash = self.chain_hash(parent, block.token_ids)
                self.hash_to_block.setdefault(block.hash, block.id)
            seq.num_hashed_blocks = i + 1

    # ----- allocation -----
    def _take(self) -> int:
        block_id, _ = self.free.popitem(last=False)          # least recently freed first
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]               # evicted from the prefix cache
        block.hash = block.token_ids = None
        block.ref_count = 1
        return block_id

    def can_admit(self, cached: list[int], num_slots: int) -> bool:
        """Enough free blocks for a new sequence reusing `cached` blocks and covering num_slots positions?"""
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)   # cached but free: leave the free list
        return self.blocks_for(num_slots) - len(cached) <= self.num_free_blocks - revived

    def admit(self, seq: Sequence, cached: list[int], num_slots: int) -> None:
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = list(cached)
        seq.num_computed = seq.num_hashed_blocks = len(cached)
        seq.num_computed *= self.block_size
        self.prefix_hits += seq.num_computed
        self.ensure_slots(seq, num_slots)

    def slots_cost(self, seq: Sequence, num_slots: int) -> int:
        """Free blocks needed so that seq can write positions [num_computed, num_slots)."""
        need, table = self.blocks_for(num_slots), seq.block_table
        shared = 0
        for i in range(seq.num_computed // self.block_size, min(len(table), need)):
            if self.blocks[table[i]].ref_count > 1:
                shared += 1
        return max(0, need - len(table)) + shared

    def can_grow(self, seq: Sequence, num_slots: int) -> bool:
        return self.slots_cost(seq, num_slots) <= len(self.free)

    def ensure_slots(self, seq: Sequence, num_slots: int) -> None:
        """Give seq blocks for positions < num_slots, copying shared blocks it is about to write (caller checked
        can_grow / can_admit)."""
        bs, table = self.block_size, seq.block_table
        for i in range(seq.num_computed // bs, min(len(table), self.blocks_for(num_slots))):
            old = self.blocks[table[i]]
            if old.ref_count > 1:                              # copy-on-write
                old.ref_count -= 1
                new = self._take()
                self.pending_copies.append((old.id, new))
                table[i] = new
        while len(table) * bs < num_slots:
            table.append(self._take())

    def free_seq(self, seq: Sequence) -> None:
        # Tail blocks first: they are evicted first, so shared prefixes stay cached longest.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed = seq.num_hashed_blocks = 0

    def fork(self, child: Sequence) -> None:
        """child already copied its parent's block table: take a reference on every block."""
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1

    def slot_of(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
