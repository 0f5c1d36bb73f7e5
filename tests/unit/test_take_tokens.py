"""Taking tokens by per-row index (policy.tokens) and the tier plan's split
of the ranking into levels (pure tensor bookkeeping)."""

import pytest
import torch

from vllm_kvshrink.policy.tokens import take_tokens
from vllm_kvshrink.storage.policy import _splitter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_take_tokens_is_the_element_wise_gather(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 17, 8, generator=g).to(dtype)
    for k in (0, 1, 5, 17, 30):  # repeats allowed
        idx = torch.randint(0, 17, (3, 2, k), generator=g)
        ref = x.gather(2, idx[..., None].expand(-1, -1, -1, 8))
        out = take_tokens(x, idx)
        assert out.shape == (3, 2, k, 8) and out.dtype == dtype
        assert torch.equal(out, ref)
    # a non-contiguous input (the cache-order read is a permuted view)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    idx = torch.randint(0, 17, (3, 2, 6), generator=g)
    assert torch.equal(take_tokens(xt, idx), x.gather(2, idx[..., None].expand(-1, -1, -1, 8)))


def test_take_tokens_refuses_an_index_outside_the_row():
    x = torch.zeros(2, 2, 4, 3)
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        take_tokens(x, torch.full((2, 2, 1), 4))
    with pytest.raises(IndexError):
        take_tokens(x, torch.full((2, 2, 1), -1))  # would read the previous row
    with pytest.raises(ValueError, match="must be"):
        take_tokens(x, torch.zeros(1, 2, 1, dtype=torch.int64))


def test_split_is_the_per_rank_best_form_made_monotone():
    g = torch.Generator().manual_seed(1)
    cost, dist = [128.0, 66.0, 34.0, 18.0], [0.0, 0.02, 0.1, 0.4]
    for m in (1, 7, 300):
        w = torch.rand(m, generator=g) ** 4
        w = (w / w.sum()).sort(descending=True).values
        split = _splitter(w, cost, dist)
        for lam in (0.0, 1e-7, 1e-5, 1e-4, 1e-3, 1.0):
            # brute force, rank by rank: the form with the least w*d + lam*b,
            # evicted (d = 1, b = 0) past the last level; runs made monotone
            best = []
            for r in range(m):
                obj = [float(torch.tensor(w[r].item(), dtype=torch.float32) * dd
                             + torch.tensor(lam, dtype=torch.float32) * bb)
                       for dd, bb in zip(dist + [1.0], cost + [0.0])]
                best.append(min(range(len(obj)), key=lambda i: (obj[i], i)))
            runs = [max(best[: r + 1]) for r in range(m)]
            assert split(lam) == [runs.count(i) for i in range(len(cost))]
            assert sum(split(lam)) <= m
