"""Where a tier event's tokens go when it writes in place (pure bookkeeping)."""

import pytest
import torch

from vllm_kvshrink.serving.worker.tier_write import form_slots, place


def test_place_keeps_staying_tokens_and_fills_the_free_slots_below_the_count():
    # Two rows of 8 tokens (cache order); level of 4 tokens after the event.
    slot = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 0], [3, 9, 9, 0, 4, 1, 0, 0]])
    stays = torch.tensor([[1, 0, 1, 0, 0, 1, 0, 0], [1, 0, 0, 1, 1, 1, 0, 0]]).bool()
    joins = torch.tensor([[1, 0, 1, 0, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1, 0, 0]]).bool()
    dst, tok, at = place(slot, stays, joins, 4)
    # Row 0: tokens 0 and 2 stay at slots 0 and 2; token 5 (slot 5, beyond the
    # count) moves to the first free slot 1, token 6 (entering) to slot 3.
    assert at[0].tolist() == [0, 5, 2, 6]
    # Row 1: token 4 (slot 4) moves to slot 2; tokens 0, 3, 5 stay.
    assert at[1].tolist() == [3, 5, 4, 0]
    assert dst[0].tolist() == [1, 3] and tok[0].tolist() == [5, 6]
    assert dst[1].tolist() == [2, 2] and tok[1].tolist() == [4, 4]  # padded: repeated


def test_place_moves_nothing_when_every_slot_keeps_its_token():
    slot = torch.tensor([[1, 0, 2]])
    stays = torch.ones(1, 3, dtype=torch.bool)
    dst, tok, at = place(slot, stays, stays, 3)
    assert dst is None and tok is None and at.tolist() == [[1, 0, 2]]


def test_form_slots_number_each_form_s_pages_in_order():
    segs = [(7, "int4_tok", 3), (2, "int8_tok", 2), (5, "int4_tok", 1)]
    local = form_slots(segs, lambda form: 3)
    assert local.tolist() == [0, 1, 2, 0, 1, 3]
    assert form_slots([(7, "int4_tok", 2), (5, "int4_tok", 1)], lambda f: 3) is None


# ------------------------------------------------ writes on a real page pool
from vllm_kvshrink.kernels.layouts import stack_layers  # noqa: E402
from vllm_kvshrink.serving import plan as plan_mod  # noqa: E402
from vllm_kvshrink.serving.worker import tier_write  # noqa: E402
from vllm_kvshrink.serving.worker.kv_layout import (  # noqa: E402
    TokenLayout,
    read_row_stacked,
    row_slots,
    write_tokens_stacked,
)
from vllm_kvshrink.serving.worker.tiers import TierState, read_held  # noqa: E402
from vllm_kvshrink.storage.policy import apply_tiers, levels_for, plan_tiers  # noqa: E402

STORAGE = ("bf16", "int8_tok_rot", "int4_tok_rot", "int2_tok_rot")


class _Pool:
    """The worker's view of a cache (what tier events use of the compactor):
    bf16 pages in vLLM's CPU "vec" layout, all layers back to back."""

    def __init__(self, layers=2, nb=60, heads=3, bs=16, d=64, kind="k_transposed"):
        t, j = torch.arange(bs)[:, None], torch.arange(d)[None, :]
        key, value = (j * bs + t if kind == "k_transposed" else t * d + j), bs * d + t * d + j
        if kind == "generic":  # any in-block layout (vLLM's AMX tiles are one)
            perm = torch.randperm(2 * bs * d, generator=torch.Generator().manual_seed(0))
            key, value = perm[: bs * d].view(bs, d), perm[bs * d:].view(bs, d)
        self.layout = TokenLayout(bs, d, key, value)
        assert self.layout.kind == kind
        base = torch.randn(layers * nb * heads * bs * 2 * d).bfloat16()
        self.caches = [c.view(nb, heads, bs, 2 * d) for c in base.chunk(layers)]
        self.stacks = [(stack_layers(self.caches, contiguous=True), slice(None))]
        self.head_size, self.block_size, self.num_kv_heads = d, bs, heads

    def token_layout(self):
        return self.layout

    def read_row(self, blocks, n, half):
        return read_row_stacked(self.stacks[0][0], self.layout, blocks, n, half)

    def write_plain(self, blocks, start, k, v):
        b, o = row_slots(blocks, start + torch.arange(k.shape[2]), self.block_size)
        write_tokens_stacked(self.stacks[0][0], self.layout, k.bfloat16(), v.bfloat16(), b, o)


def _event(pool, plain_blocks, old_len, logical, segments, dest):
    return plan_mod.TierEvent(
        req_id="r", old_len=old_len, logical_len=logical, plain_blocks=plain_blocks,
        segments=segments, dest_blocks=dest, budget_bytes=0, storage=STORAGE,
        method="snapkv", sink_tokens=4, recent_tokens=8)


def _plan(held, budget_frac, seed):
    layers, heads, n = held.level.shape
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(layers, heads, n, generator=g)
    budget = int(budget_frac * layers * heads * n * 4 * 64)
    return plan_tiers(scores, levels_for(STORAGE), budget, 64, 4, 8,
                      [0.0, 0.02, 0.03, 0.04], current=held.level)


def _check_event(pool, ev, state, plan_seed, frac, writer):
    """Run one event with ``writer``; the tokens read back (dequantized) are
    what the research path holds (:func:`apply_tiers`), the pool untouched
    until the writer's ``write`` runs.  Returns the new state."""
    held = read_held(pool, ev, state)
    plan = _plan(held, frac, plan_seed)
    levels = levels_for(STORAGE)
    before = pool.stacks[0][0].view(torch.uint8).clone()  # bytes: packed pages read as NaN
    if writer == "in_place":
        laid = tier_write.in_place(pool, levels, plan.counts, plan.level, held,
                                   ev.plain_blocks, ev.segments, ev.dest_blocks)
    else:
        laid = tier_write.rewrite(pool, levels, plan.counts, plan.level, held,
                                  ev.dest_blocks, [b for b, _, _ in ev.segments])
    assert laid is not None
    layout, write = laid
    assert torch.equal(pool.stacks[0][0].view(torch.uint8), before)  # nothing written yet
    write()
    new = TierState(layout.segments, layout.pos_packed, layout.pos_plain, ev.logical_len)
    keep = plan.keep()
    want_k, want_v = apply_tiers(plan, held.keys.float(), held.values.float(), keep,
                                 held.level)
    back = read_held(pool, _event(pool, layout.plain_blocks, plan.counts[0], ev.logical_len,
                                  layout.segments, []), new)
    assert torch.equal(back.pos, held.pos.gather(2, keep))
    assert torch.equal(back.level, plan.level.gather(2, keep))
    torch.testing.assert_close(back.keys, want_k, atol=1e-5, rtol=0)
    torch.testing.assert_close(back.values, want_v, atol=1e-5, rtol=0)
    return new, layout, plan


#: (budget as a fraction of the bf16 bytes, tokens arriving before) per event
EVENTS = [(0.26, 0), (0.44, 20), (0.43, 90), (0.22, 20)]


@pytest.fixture
def slots_in_range(monkeypatch):
    """Every slot the writers address lies inside its form's page (a slot
    past the capacity reads or writes another page's bytes, or past the
    pool)."""
    for name in ("put_tokens", "get_tokens"):
        real = getattr(tier_write, name)

        def checked(regions, pf, blocks, slots, *rest, real=real):
            assert int(slots.min()) >= 0 and int(slots.max()) < pf.capacity, pf.name
            assert int(blocks.min()) >= 0 and int(blocks.max()) < regions.shape[1], pf.name
            return real(regions, pf, blocks, slots, *rest)

        monkeypatch.setattr(tier_write, name, checked)


@pytest.mark.usefixtures("slots_in_range")
@pytest.mark.parametrize("kind", ["k_transposed", "row_major", "generic"])
def test_in_place_events_hold_what_the_research_path_holds(kind):
    """Three events on one request, new tokens arriving between them: each
    level's tokens read back equal apply_tiers' (tokens staying in a form
    keep their bytes, entering ones packed from what they held), nothing is
    written before the plan is complete, and the blocks used are the
    request's own or the event's fresh ones."""
    pool = _Pool(kind=kind, nb=90)
    bs = pool.block_size
    free = list(range(pool.caches[0].shape[0]))
    plain = [free.pop() for _ in range(7)]  # 112 slots, 100 tokens
    state, n, logical, segments = None, 100, 100, []
    for step, (frac, arrive) in enumerate(EVENTS):
        if arrive:  # decode steps appended plain tokens after the last event
            while len(plain) * bs < n + arrive:
                plain.append(free.pop())
            k = torch.randn(2, 3, arrive, 64)
            pool.write_plain(plain, n, k, torch.randn(2, 3, arrive, 64))
            n += arrive
            logical += arrive
        fresh = [free.pop() for _ in range(4)]
        dest = plain + [b for b, _, _ in segments] + fresh
        ev = _event(pool, plain, n, logical, segments, dest)
        state, layout, plan = _check_event(pool, ev, state, step, frac, "in_place")
        used = set(layout.plain_blocks) | {b for b, _, _ in layout.segments}
        assert used <= set(dest) and len(used) == len(layout.plain_blocks) + len(layout.segments)
        free += [b for b in dest if b not in used]
        plain, segments, n = list(layout.plain_blocks), list(layout.segments), plan.counts[0]
        assert sum(c for c in plan.counts[1:]) > 0


def test_rewrite_holds_the_same_as_in_place_on_a_first_event():
    pool = _Pool()
    plain = list(range(7))
    ev = _event(pool, plain, 100, 100, [], list(range(10, 20)))
    a, la, _ = _check_event(pool, ev, None, 5, 0.3, "rewrite")
    assert set(la.plain_blocks) <= set(range(10, 20))
