"""The KV heads a decision spans, when some of them live in another process.

Under tensor parallelism vLLM gives each rank a contiguous share of a layer's
KV heads (rank ``r`` holds heads ``[r * h, (r + 1) * h)``).  Most of a
compression event is per (layer, KV head) and needs nothing from the other
ranks; a decision that reduces over heads (TOVA's layer score, the adaptive
selection's coverage, the tier policy's rank weights, count floors and
distortion) must see every head, or the ranks would keep different counts
and different tokens than the single-rank engine.

:class:`HeadGroup` is the one seam for that: :meth:`HeadGroup.gather` returns
a tensor over *all* of the model's KV heads (rank order), so the reduction
that follows is the single-rank reduction, computed identically on every
rank.  The single-process default (:data:`LOCAL`) gathers nothing; the
engine's tensor-parallel group is
:class:`vllm_kvshrink.serving.worker.tp_group.TPHeads`.

An event also ends with :meth:`HeadGroup.agree` before it writes anything:
every rank has read and planned, or none writes (:class:`PeerFailed`).
"""

from __future__ import annotations

import torch


class PeerFailed(RuntimeError):
    """Another rank's part of the same event failed; this rank falls back too."""


class HeadGroup:
    """The KV heads of one process only (no tensor parallelism)."""

    #: ranks sharing a layer's KV heads
    size: int = 1
    #: this process's place among them
    rank: int = 0

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``x`` (this rank's heads along ``dim``) over every rank's heads,
        rank order; the same tensor on every rank."""
        return x

    def begin(self) -> None:
        """An event starts: until :meth:`agree` (or a failure) its exchanges
        are open."""

    def agree(self) -> None:
        """Every rank's event has been read and planned; raises
        :class:`PeerFailed` where another rank's has not."""

    def fail(self, why: str) -> None:
        """This rank's event failed: tell the others if they are still
        exchanging for it (before :meth:`agree`; nothing after)."""

    def local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's share of a tensor gathered over every head along ``dim``."""
        if self.size == 1:
            return x
        h = x.shape[dim] // self.size
        return x.narrow(dim, self.rank * h, h)


#: a single process holding every head
LOCAL = HeadGroup()


class ExchangeGroup(HeadGroup):
    """Heads split over ``size`` ranks that exchange through one collective,
    :meth:`all_gather` (every rank's object, rank order; subclasses supply it).

    Every exchange carries a flag with the payload, so a rank whose event
    failed says so in the next exchange the others make, whichever it is
    (:meth:`fail` sends the flag alone; all-gather of objects takes payloads
    of any size): then every rank raises :class:`PeerFailed` from that
    exchange and makes no further one for the event.  That keeps the ranks'
    exchanges in step however far each got, provided every rank runs the same
    events in the same order (the scheduler's plan is the same for all).
    """

    def __init__(self, size: int, rank: int) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} outside a group of {size}")
        self.size, self.rank = size, rank
        self._open = False

    def all_gather(self, obj) -> list:
        raise NotImplementedError

    def _exchange(self, ok: bool, payload):
        if not self._open:
            raise RuntimeError("a tensor-parallel exchange outside an event "
                               "(begin() first; none after agree() or a failure)")
        got = self.all_gather((ok, payload))
        bad = [i for i, (fine, _) in enumerate(got) if not fine]
        if bad:
            self._open = False
            if ok:
                raise PeerFailed(f"tensor-parallel rank {bad[0]} failed: {got[bad[0]][1]}")
        return [p for _, p in got]

    def begin(self) -> None:
        self._open = True

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        parts = self._exchange(True, x.detach().cpu().contiguous())
        return torch.cat([p.to(x.device) for p in parts], dim)

    def agree(self) -> None:
        self._exchange(True, None)
        self._open = False

    def fail(self, why: str) -> None:
        if self._open:
            self._exchange(False, why)
