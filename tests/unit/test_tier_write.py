"""Where a tier event's tokens go when it writes in place (pure bookkeeping)."""

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
