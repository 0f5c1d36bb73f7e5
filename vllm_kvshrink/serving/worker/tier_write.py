"""Where a tier event's tokens go, and the writes that put them there.

A tier event (:mod:`.tiers`) has read every token the request holds and
planned each one's form.  Two ways to lay the result out:

* :func:`in_place` -- every token's bytes are its own (the paged forms are
  token-local: codes and parameters per token), so a token that keeps its
  form keeps its bytes.  Per (layer, KV head), a level of ``c`` tokens
  occupies slots ``[0, c)`` of its pages (the plain row for ``bf16``, the
  form's pages for a packed form, each full but the last); the tokens that
  stay and already sit below ``c`` are not touched, and the free slots below
  ``c`` take the tokens that stay but sit beyond it and the tokens entering
  the level (packed from what they hold now).  The work is in proportion to
  what changes: the bf16 tokens that arrived since the last event, the tokens
  demoted, and as many moves as the level lost tokens.  Pages a level no
  longer needs go back; pages it needs more of come from the event's blocks.
  Needs the request's plain blocks to be its own (not shared through the
  prefix cache), since they are written in place.
* :func:`rewrite` -- everything into fresh destinations: the plain tokens
  first, then each packed level's pages (:func:`~vllm_kvshrink.kernels.quant.
  pack`); the way when a plain block is shared.

Both compute everything before writing anything (a failure leaves the request
as it was) and return a :class:`Layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvshrink.kernels.quant import pack, pack_tokens, slot_parts
from vllm_kvshrink.policy.tokens import take_tokens
from vllm_kvshrink.serving.worker.kv_layout import row_slots, write_tokens_stacked
from vllm_kvshrink.storage.paged import paged_form


@dataclass
class Held:
    """What an event read, cache order (ascending logical position per
    (layer, KV head)); ``[L, H, N]`` unless said otherwise."""

    #: ``[L, H, N, D]`` float32, packed tokens dequantized (a first event's,
    #: plain tokens only: the cache dtype)
    keys: torch.Tensor
    values: torch.Tensor  # [L, H, N, D]
    level: torch.Tensor  # int8 index into the levels held now
    pos: torch.Tensor  # logical positions
    #: where each token is stored: ``< M`` its index among the packed tokens
    #: (segments in order), else ``M +`` its plain-row slot
    where: torch.Tensor
    packed: int  # M


@dataclass
class Layout:
    """An event's result: the plain row, the packed segments ``(block, form,
    n)`` and the logical positions of what they hold (``[L, H, c0]``, plain
    slots; ``[L, H, M']``, packed tokens in segment order)."""

    plain_blocks: list[int]
    segments: list[tuple[int, str, int]]
    pos_plain: torch.Tensor
    pos_packed: torch.Tensor


def region_bytes(stack: torch.Tensor) -> torch.Tensor:
    """A stacked cache view ``[L', NB, H, bs, 2D]`` as the bytes of its
    (block, head) regions: ``[L', NB, H, region_bytes]``."""
    return stack.view(torch.uint8).view(*stack.shape[:3], -1)


def geometry(comp):
    """``(head_dim, block_size, element bytes)`` of the cache."""
    c = comp.caches[0]
    return comp.head_size, comp.block_size, c.element_size()


def zero_blocks(comp, blocks: list[int]) -> None:
    """Zero ``blocks`` in every layer (packed pages leaving the packed form)."""
    if not blocks:
        return
    t = torch.tensor(sorted(set(blocks)), dtype=torch.int64)
    for stack, _ in comp.stacks:
        stack.view(torch.uint8)[:, t] = 0


def cache_dtype(comp):
    """The dtype tokens are written in: the cache's, float32 for a byte cache."""
    c = comp.caches[0]
    return c.dtype if c.is_floating_point() else torch.float32


# ----------------------------------------------------------------- rewrite
def rewrite(comp, levels, counts, new_level, held: Held, dest: list[int],
            old_packed: list[int]) -> tuple[Layout, callable]:
    """Lay every kept token out anew in ``dest``; returns the layout and the
    function that writes it (call it only once everything is planned)."""
    d, bs, eb = geometry(comp)
    layers, heads = held.level.shape[:2]
    keep = (new_level >= 0).nonzero()[:, 2].view(layers, heads, -1)
    lev = new_level.gather(2, keep)
    need = -(-counts[0] // bs)
    pages_of = {name: -(-counts[i] // paged_form(name, d, bs, eb).capacity)
                for i, name in enumerate(levels[1:], 1) if counts[i]}
    if need + sum(pages_of.values()) > len(dest):
        raise RuntimeError(f"the plan needs {need + sum(pages_of.values())} blocks, "
                           f"{len(dest)} were given")
    dest = list(dest)
    plain_ids, dest = dest[:need], dest[need:]
    writes, segments, pos_packed = [], [], []
    pos0 = held.pos[..., :0]
    for i, name in enumerate(levels):
        c = counts[i]
        if not c:
            continue
        sel = (lev == i).nonzero()[:, 2].view(layers, heads, c)  # ascending
        src = keep.gather(2, sel)
        k, v = take_tokens(held.keys, src), take_tokens(held.values, src)
        if i == 0:
            pos0 = held.pos.gather(2, src)
            writes.append(("plain", k, v))
            continue
        pf = paged_form(name, d, bs, eb)
        pages = pack(pf, k.reshape(-1, c, d), v.reshape(-1, c, d))
        ids, dest = dest[: pages.shape[1]], dest[pages.shape[1]:]
        writes.append(("packed", ids, pages.view(layers, heads, len(ids), -1)))
        for j, b in enumerate(ids):
            segments.append((b, name, min(pf.capacity, c - j * pf.capacity)))
        pos_packed.append(held.pos.gather(2, src))
    layout = Layout(plain_ids, segments, pos0, _cat_pos(pos_packed, layers, heads))

    def write() -> None:
        cdt = cache_dtype(comp)
        token_layout = comp.token_layout()
        new_packed = {b for b, _, _ in segments}
        zero_blocks(comp, [b for b in old_packed if b not in new_packed])
        for w in writes:
            if w[0] == "plain":
                _, k, v = w
                blocks, offs = row_slots(plain_ids, torch.arange(counts[0]), bs)
                for stack, sl in comp.stacks:
                    write_tokens_stacked(stack, token_layout, k[sl].to(cdt), v[sl].to(cdt),
                                         blocks, offs)
            else:
                _, ids, pages = w
                t = torch.tensor(ids, dtype=torch.int64)
                for stack, sl in comp.stacks:
                    region_bytes(stack)[:, t] = pages[sl].permute(0, 2, 1, 3)

    return layout, write


def _cat_pos(parts, layers, heads):
    return (torch.cat(parts, -1) if parts
            else torch.zeros(layers, heads, 0, dtype=torch.int64))


# ---------------------------------------------------------------- in place
def form_slots(segments, capacity) -> torch.Tensor | None:
    """``[M]`` each packed token's slot within its form's pages (the k-th
    page of a form holds slots ``[k * cap, (k + 1) * cap)``), or ``None``
    when a form's pages are not full but the last (then :func:`in_place`
    cannot use them)."""
    out, seen = [], {}
    per_form = {}
    for _, form, n in segments:
        per_form.setdefault(form, []).append(n)
    for form, ns in per_form.items():
        cap = capacity(form)
        if any(n != cap for n in ns[:-1]):
            return None
    for _, form, n in segments:
        k = seen.get(form, 0)
        seen[form] = k + 1
        out.append(k * capacity(form) + torch.arange(n))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def place(slot: torch.Tensor, stays: torch.Tensor, joins: torch.Tensor, c: int):
    """Where a level's tokens go, per row (``[R, N]`` arguments, tokens in
    cache order): ``slot`` the slot a token staying in the level holds now
    (read where ``stays``), ``joins`` the tokens in the level after the
    event (``c`` per row).  A staying token below ``c`` keeps its slot; the
    free slots below ``c`` take, in order, the other tokens of ``joins``.

    Returns ``(dst, tok, token_at)``: ``[R, P]`` slots and the tokens placed
    there (rows placing fewer than ``P`` repeat their first placement, rows
    placing none rewrite slot 0 with the token it holds), and ``[R, c]`` the
    token at every slot afterwards; ``dst`` and ``tok`` are ``None`` when
    nothing moves.
    """
    r, _ = joins.shape
    in_place = stays & (slot < c)
    token_at = torch.full((r, c), -1, dtype=torch.int64)
    ri, ni = in_place.nonzero(as_tuple=True)
    token_at[ri, slot[ri, ni]] = ni
    free = token_at < 0
    nfree = free.sum(-1)
    p = int(nfree.max()) if c else 0
    if p == 0:
        return None, None, token_at
    slots = torch.sort(free.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :p]
    moving = joins & ~in_place
    toks = torch.sort(moving.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :p]
    valid = torch.arange(p) < nfree[:, None]
    some = nfree > 0
    first_dst = torch.where(some, slots[:, 0], torch.zeros_like(nfree))
    first_tok = torch.where(some, toks[:, 0], token_at[:, 0])
    dst = torch.where(valid, slots, first_dst[:, None])
    tok = torch.where(valid, toks, first_tok[:, None])
    token_at.scatter_(1, dst, tok)
    return dst, tok, token_at


def in_place(comp, levels, counts, new_level, held: Held, plain_blocks: list[int],
             segments, dest: list[int]) -> tuple[Layout, callable] | None:
    """The in-place layout (see the module docstring) and its writer, or
    ``None`` where it does not apply (a plain block not the request's own,
    a form's pages not full but the last)."""
    d, bs, eb = geometry(comp)
    mine = set(dest)
    if any(b not in mine for b in plain_blocks):
        return None
    cap = {name: paged_form(name, d, bs, eb).capacity for name in levels[1:]}
    local = form_slots(segments, cap.__getitem__)
    if local is None:
        return None
    layers, heads, n = held.level.shape
    rows = layers * heads
    m = held.packed
    where = held.where.reshape(rows, n)
    cur = held.level.reshape(rows, n)
    new = new_level.reshape(rows, n)
    seg_of = torch.tensor([j for j, (_, _, k) in enumerate(segments) for _ in range(k)],
                          dtype=torch.int64)
    in_seg = (torch.cat([torch.arange(k) for _, _, k in segments]) if segments
              else torch.zeros(0, dtype=torch.int64))
    seg_block = torch.tensor([b for b, _, _ in segments] or [0], dtype=torch.int64)
    # where -> slot in the token's level (plain slot, or slot in its form's pages)
    slot = torch.where(where < m, local[where.clamp(max=max(m - 1, 0))] if m else where,
                       where - m)

    # bf16: the plain row keeps its first ceil(c0 / bs) blocks.
    c0 = counts[0]
    plain_ids = list(plain_blocks[: -(-c0 // bs)])
    dst0, tok0, at0 = place(slot, (cur == 0) & (new == 0), new == 0, c0)
    # Packed levels: a form keeps its first pages, takes more from the pool.
    kept_pages = {}
    for i, name in enumerate(levels[1:], 1):
        own = [b for b, f, _ in segments if f == name]
        kept_pages[name] = own[: -(-counts[i] // cap[name])]
    taken = set(plain_ids).union(*map(set, kept_pages.values()))
    pool = [b for b in dest if b not in taken]
    plans, new_segments, pos_packed = [], [], []
    for i, name in enumerate(levels[1:], 1):
        c = counts[i]
        if not c:
            continue
        pages = list(kept_pages[name])
        more = -(-c // cap[name]) - len(pages)
        if more > len(pool):
            raise RuntimeError(f"the plan needs {more} more {name} pages, "
                               f"{len(pool)} blocks are free")
        pages += pool[:more]
        pool = pool[more:]
        dst, tok, at = place(slot, (cur == i) & (new == i), new == i, c)
        plans.append((i, name, pages, dst, tok))
        for j, b in enumerate(pages):
            new_segments.append((b, name, min(cap[name], c - j * cap[name])))
        pos_packed.append(held.pos.reshape(rows, n).gather(1, at).view(layers, heads, c))
    pos_plain = held.pos.reshape(rows, n).gather(1, at0).view(layers, heads, c0)

    # Read and pack everything the writes need before writing any of it.
    cdt = cache_dtype(comp)
    plain_write = None
    if dst0 is not None:
        sel = tok0.view(layers, heads, -1)
        blocks, offs = row_slots(plain_ids, dst0, bs)
        plain_write = (take_tokens(held.keys, sel).to(cdt), take_tokens(held.values, sel).to(cdt),
                       blocks.view(layers, heads, -1), offs.view(layers, heads, -1))
    packed_writes = []
    for i, name, pages, dst, tok in plans:
        if dst is None:
            continue
        pf = paged_form(name, d, bs, eb)
        p = dst.shape[1]
        sel = tok.view(layers, heads, p)
        fresh = pack_tokens(pf, take_tokens(held.keys, sel).reshape(rows, p, d),
                            take_tokens(held.values, sel).reshape(rows, p, d))  # [R, P, tb]
        entering = cur.gather(1, tok) != i
        blob = fresh
        if not bool(entering.all()):  # staying tokens moved: their bytes as they are
            # (an entering token's entry reads slot 0 of some page, unused)
            w = where.gather(1, tok).clamp(max=max(m - 1, 0))
            t = torch.where(entering, 0, in_seg[w]).view(layers, heads, p)
            ob = seg_block[seg_of[w]].view(layers, heads, p)
            old = torch.cat([get_tokens(region_bytes(stack), pf, ob[sl], t[sl])
                             for stack, sl in comp.stacks])
            blob = torch.where(entering[..., None], fresh, old.view(rows, p, -1))
        page_ids = torch.tensor(pages, dtype=torch.int64)
        packed_writes.append((pf, page_ids[dst // pf.capacity].view(layers, heads, p),
                              (dst % pf.capacity).view(layers, heads, p),
                              blob.view(layers, heads, p, -1)))
    old_packed = [b for b, _, _ in segments]
    layout = Layout(plain_ids, new_segments, pos_plain, _cat_pos(pos_packed, layers, heads))

    def write() -> None:
        new_packed = {b for b, _, _ in new_segments}
        zero_blocks(comp, [b for b in old_packed if b not in new_packed])
        if plain_write is not None:
            k, v, blocks, offs = plain_write
            token_layout = comp.token_layout()
            for stack, sl in comp.stacks:
                write_tokens_stacked(stack, token_layout, k[sl], v[sl], blocks[sl], offs[sl])
        for pf, blk, slot, blob in packed_writes:
            for stack, sl in comp.stacks:
                put_tokens(region_bytes(stack), pf, blk[sl], slot[sl], blob[sl])

    return layout, write


def _lh(regions: torch.Tensor):
    return (torch.arange(regions.shape[0])[:, None, None],
            torch.arange(regions.shape[2])[None, :, None])


def put_tokens(regions: torch.Tensor, pf, blocks: torch.Tensor, slots: torch.Tensor,
               blob: torch.Tensor) -> None:
    """Write tokens' page bytes ``blob`` ``[L', H, P, token_bytes]`` to slot
    ``slots[l, h, p]`` of page ``blocks[l, h, p]`` of (layer ``l``, KV head
    ``h``): whole rows of codes and parameters, not byte by byte."""
    layer, head = _lh(regions)
    off = 0
    for part in slot_parts(pf, regions):
        w = part.shape[-1]
        part[layer, blocks, head, slots] = blob[..., off:off + w]
        off += w


def get_tokens(regions: torch.Tensor, pf, blocks: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
    """The page bytes ``[L', H, P, token_bytes]`` of the tokens at
    (``blocks``, ``slots``), as :func:`put_tokens` takes them."""
    layer, head = _lh(regions)
    return torch.cat([part[layer, blocks, head, slots] for part in slot_parts(pf, regions)],
                     -1)
