"""The tensor-parallel ranks of the worker, as the policy's head group.

vLLM splits a layer's KV heads across its tensor-parallel group; this is
:class:`~vllm_kvshrink.policy.heads.ExchangeGroup` over that group's CPU
(gloo) process group: one all-gather of Python objects per exchange, so a
rank that failed can answer whatever exchange the others are in
(:mod:`vllm_kvshrink.policy.heads` explains the protocol).  Exchanges are
few and small: a layer score or a rank weight vector per event, the
distortion of a few layers when it is measured, and one agreement flag.
"""

from __future__ import annotations

import torch.distributed as dist

from vllm_kvshrink.policy.heads import LOCAL, ExchangeGroup, HeadGroup


class TPHeads(ExchangeGroup):
    def __init__(self, group) -> None:
        super().__init__(group.world_size, group.rank_in_group)
        self._group = group.cpu_group

    def all_gather(self, obj) -> list:
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self._group)
        return out


def worker_heads() -> HeadGroup:
    """This worker's head group: vLLM's tensor-parallel group when it has
    more than one rank, else :data:`~vllm_kvshrink.policy.heads.LOCAL`."""
    from vllm.distributed import parallel_state

    from vllm_kvshrink.serving import compat

    group = parallel_state.get_tp_group()
    compat.check_attributes("tp_group", group)
    if group.world_size == 1:
        return LOCAL
    return TPHeads(group)
