"""The requests of a step whose cache is partly held in packed blocks, as the
packed-attention backends (:mod:`.packed_reference`, :mod:`.cpu_ext`,
:mod:`.triton_packed`) take them, and what they share: the argument check and
the rotation of queries and outputs.

A request's cached tokens are a *plain* region (its block-table row, in the
cache dtype, causal for this step's queries, which are its newest tokens) and
packed *segments* (``n`` tokens of a :class:`~.quant.PagedForm` in one block,
all older than every query).

Rotated forms are read in the rotated space: queries enter rotated
(``q @ H``) for those segments and the kernels return the part of the output
that came from rotated values separately (``o_rot``), rotated back here once
(``o = o_plain + o_rot @ H``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvshrink.kernels.hadamard import hadamard
from vllm_kvshrink.kernels.quant import PagedForm

#: cache layouts of the plain region (vLLM's CPU "vec" ISA transposes keys);
#: an :class:`IndexMap` is code 2
LAYOUT_CODES = {"cpu_k_transposed": 0, "cpu_row_major": 1}


@dataclass(frozen=True, eq=False)
class IndexMap:
    """A plain-cache layout given by where each element lies: ``key_index`` /
    ``value_index`` ``[block_size * D]`` int32, the element offset within a
    (block, head) region of K / V element ``(t, e)`` at ``[t * D + e]``.  Any
    in-block layout has one, e.g. vLLM's AMX tiles (VNNI pairs of 16-token
    tiles), which have no strided form; the worker probes it through vLLM's
    own cache write (``serving/worker/kv_layout.probe_layout``)."""

    key_index: torch.Tensor
    value_index: torch.Tensor


def layout_code(layout) -> int:
    """The kernels' code of a plain-cache ``layout`` (a name of
    :data:`LAYOUT_CODES` or an :class:`IndexMap`)."""
    if isinstance(layout, IndexMap):
        return 2
    if layout not in LAYOUT_CODES:
        raise ValueError(f"layout={layout!r}; allowed: {', '.join(LAYOUT_CODES)} or an "
                         f"IndexMap")
    return LAYOUT_CODES[layout]


@dataclass
class PackedBatch:
    """The requests of one step that have packed blocks (same for every layer).

    Attributes:
        q_start, q_len: ``[R]`` int64, each request's rows of the flattened
            query batch.
        plain_len: ``[R]`` int64, tokens in its plain region (this step's
            included).
        plain_table: ``[R, max_blocks]`` int32, its block-table row.
        seg_start: ``[R + 1]`` int64, its segments are
            ``seg_start[r]:seg_start[r + 1]``.
        seg_block, seg_form, seg_n: ``[S]`` int64: block id, index into
            ``forms``, token count of each segment.
        forms: the paged forms the segments use.
    """

    q_start: torch.Tensor
    q_len: torch.Tensor
    plain_len: torch.Tensor
    plain_table: torch.Tensor
    seg_start: torch.Tensor
    seg_block: torch.Tensor
    seg_form: torch.Tensor
    seg_n: torch.Tensor
    forms: list[PagedForm]
    #: per cache geometry: what a kernel checked and laid out once per step
    prepared: dict = field(default_factory=dict, repr=False, compare=False)
    _rows: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def num_reqs(self) -> int:
        """``R``, the requests in the batch."""
        return int(self.q_len.shape[0])

    def form_table(self) -> torch.Tensor:
        """``[F, 7]`` int64 per form: k_bits, v_bits, rotate, capacity, and the
        byte offsets of key codes, value codes, parameters."""
        rows = [[*f.code, f.capacity, *f.offsets()] for f in self.forms]
        return torch.tensor(rows or [[0] * 7], dtype=torch.int64)

    def row_index(self) -> torch.Tensor:
        """``[sum(q_len)]`` int64: the batch rows of the output's rows."""
        if self._rows is None:
            self._rows = torch.cat([torch.arange(int(s), int(s) + int(n))
                                    for s, n in zip(self.q_start, self.q_len)] or
                                   [torch.zeros(0, dtype=torch.int64)])
        return self._rows

    def any_rotated(self) -> bool:
        """Whether some form is Hadamard-rotated (queries and outputs rotate)."""
        return any(f.rotate for f in self.forms)

    @staticmethod
    def build(reqs: list[dict], forms: list[PagedForm]) -> "PackedBatch":
        """From per-request dicts ``q_start, q_len, plain_len, plain_blocks,
        segments=[(block, form_index, n), ...]``."""
        maxb = max([len(r["plain_blocks"]) for r in reqs] + [1])
        table = torch.zeros(len(reqs), maxb, dtype=torch.int32)
        starts, blocks, fidx, ns = [0], [], [], []
        for i, r in enumerate(reqs):
            table[i, : len(r["plain_blocks"])] = torch.tensor(r["plain_blocks"],
                                                              dtype=torch.int32)
            for b, f, n in r["segments"]:
                blocks.append(b)
                fidx.append(f)
                ns.append(n)
            starts.append(len(blocks))
        i64 = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
        return PackedBatch(
            q_start=i64([r["q_start"] for r in reqs]),
            q_len=i64([r["q_len"] for r in reqs]),
            plain_len=i64([r["plain_len"] for r in reqs]),
            plain_table=table, seg_start=i64(starts), seg_block=i64(blocks),
            seg_form=i64(fidx), seg_n=i64(ns), forms=list(forms))


def check(q: torch.Tensor, cache: torch.Tensor, layout: str, batch: PackedBatch) -> None:
    """``ValueError`` unless ``q [T, Hq, D]``, one layer's ``cache
    [NB, Hkv, bs, 2D]`` in ``layout`` and ``batch`` fit together."""
    layout_code(layout)
    if q.dim() != 3 or cache.dim() != 4:
        raise ValueError(f"q must be [T, Hq, D] and cache [NB, Hkv, bs, 2D]; got "
                         f"{tuple(q.shape)} and {tuple(cache.shape)}")
    hq, d = q.shape[1:]
    nb, hkv, bs, d2 = cache.shape
    if d2 != 2 * d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(cache.shape)}")
    if isinstance(layout, IndexMap):
        for name, t in (("key_index", layout.key_index), ("value_index", layout.value_index)):
            if t.shape != (bs * d,) or t.dtype != torch.int32:
                raise ValueError(f"layout.{name} must be [block_size * D = {bs * d}] int32, "
                                 f"got {t.dtype} {tuple(t.shape)}")
            if int(t.min()) < 0 or int(t.max()) >= 2 * bs * d:
                raise ValueError(f"layout.{name} points outside a (block, head) region")
    if batch.num_reqs and bool((batch.plain_len < batch.q_len).any()):
        raise ValueError("a request's plain region is shorter than its queries")
    if batch.seg_block.numel() and (int(batch.seg_block.max()) >= nb
                                    or int(batch.seg_block.min()) < 0):
        raise ValueError("a packed segment names a block outside the cache")
    for i, f in enumerate(batch.forms):
        n = batch.seg_n[batch.seg_form == i]
        if n.numel() and (int(n.max()) > f.capacity or int(n.min()) < 1):
            raise ValueError(f"a {f.name} segment holds more than its {f.capacity} tokens")
        if f.region_bytes != 2 * bs * d * cache.element_size() or f.head_dim != d:
            raise ValueError(f"form {f.name} was laid out for another page size")


def rotated_query(q: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """``q @ H`` in float32 where some form is rotated, else ``q`` itself."""
    if not batch.any_rotated():
        return q
    return q.float() @ hadamard(q.shape[-1], q.device)


def finish(o_plain: torch.Tensor, o_rot: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Combine a kernel's two normalised partial outputs."""
    if not batch.any_rotated():
        return o_plain
    return o_plain + o_rot @ hadamard(o_plain.shape[-1], o_plain.device)


def gather_queries(q: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """The packed requests' query rows, contiguous, batch order."""
    return q.index_select(0, batch.row_index().to(q.device))


def out_starts(batch: PackedBatch) -> torch.Tensor:
    """``[R]`` int64: where each request's rows start in the output."""
    return torch.cumsum(batch.q_len, 0) - batch.q_len
