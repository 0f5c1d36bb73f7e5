"""Attention over requests whose cache is partly held in packed blocks.

A request's cached tokens are a *plain* region (its block-table row, in the
cache dtype, causal for this step's queries, which are its newest tokens) and
packed *segments* (``n`` tokens of a :class:`~vllm_kvshrink.storage.paged.
PagedForm` in one block, all older than every query).  One softmax runs over
both.  The kernels (C++ on the CPU, :mod:`.cpu_ext`; Triton on GPUs,
:mod:`.triton_packed`) dequantize inside the dot products; :func:`reference`
dequantizes everything first, then attends, and is what both are tested
against.

Rotated forms are read in the rotated space: queries enter rotated
(``q @ H``) for those segments and the kernels return the part of the output
that came from rotated values separately (``o_rot``), rotated back here once
(``o = o_plain + o_rot @ H``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvshrink.kernels.layouts import kv_views
from vllm_kvshrink.storage.hadamard import hadamard
from vllm_kvshrink.storage.paged import PagedForm, Segment, read_segments

_WARNED: list = []

#: cache layouts of the plain region (vLLM's CPU "vec" ISA transposes keys)
LAYOUT_CODES = {"cpu_k_transposed": 0, "cpu_row_major": 1}


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
    if layout not in LAYOUT_CODES:
        raise ValueError(f"layout={layout!r}; allowed: {', '.join(LAYOUT_CODES)}")
    if q.dim() != 3 or cache.dim() != 4:
        raise ValueError(f"q must be [T, Hq, D] and cache [NB, Hkv, bs, 2D]; got "
                         f"{tuple(q.shape)} and {tuple(cache.shape)}")
    hq, d = q.shape[1:]
    nb, hkv, bs, d2 = cache.shape
    if d2 != 2 * d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(cache.shape)}")
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


def _plain(cache: torch.Tensor, layout: str, blocks: torch.Tensor, n: int):
    """``[Hkv, n, D]`` K and V of a plain region."""
    k, v = kv_views(cache[None], layout)  # [1, NB, H, bs, D]
    bs = cache.shape[2]
    idx = torch.arange(n)
    blk = blocks.long()[idx // bs]
    off = idx % bs
    return k[0][blk, :, off].transpose(0, 1), v[0][blk, :, off].transpose(0, 1)


def reference(q: torch.Tensor, cache: torch.Tensor, layout: str, batch: PackedBatch,
              scale: float) -> torch.Tensor:
    """Dequantize, then attend: ``[sum(q_len), Hq, D]`` float32, the rows of
    each request in batch order."""
    check(q, cache, layout, batch)
    outs = []
    for r in range(batch.num_reqs):
        qs, ql, pl = int(batch.q_start[r]), int(batch.q_len[r]), int(batch.plain_len[r])
        kp, vp = _plain(cache, layout, batch.plain_table[r], pl)
        a, b = int(batch.seg_start[r]), int(batch.seg_start[r + 1])
        segs = [Segment(int(batch.seg_block[i]), batch.forms[int(batch.seg_form[i])],
                        int(batch.seg_n[i])) for i in range(a, b)]
        kq, vq = read_segments(cache, segs)
        from vllm_kvshrink.storage.paged import attention_ref

        outs.append(attention_ref(q[qs: qs + ql], kp, vp, kq, vq, scale))
    d = q.shape[-1]
    return torch.cat(outs) if outs else q.new_zeros(0, q.shape[1], d, dtype=torch.float32)


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


def packed_attention(q: torch.Tensor, cache: torch.Tensor, layout: str,
                     batch: PackedBatch, scale: float, impl: str = "auto") -> torch.Tensor:
    """Attention of the packed requests of a step over one layer's cache.

    Args:
        q: ``[T, Hq, D]`` this step's queries (the whole flattened batch).
        cache: ``[NB, Hkv, bs, 2D]`` one layer's pages (plain blocks in
            ``layout``, packed blocks as :mod:`vllm_kvshrink.storage.paged`
            lays them out).
        impl: ``"reference"``, ``"cpu"`` (the C++ kernel), ``"triton"``, or
            ``"auto"`` (the C++ kernel for CPU tensors when it is built, the
            Triton kernel on GPUs, else the reference).

    Returns:
        ``[sum(q_len), Hq, D]`` float32, each request's rows in batch order.
    """
    if impl == "auto":
        if q.is_cuda:
            impl = "triton"
        else:
            from vllm_kvshrink.kernels import cpu_ext

            impl = "cpu" if cpu_ext.load() else "reference"
            if impl == "reference" and not _WARNED:
                import logging

                _WARNED.append(True)
                logging.getLogger("vllm.kvshrink").warning(
                    "vllm-kvshrink: the C++ packed-attention kernel is not available "
                    "(%s); packed blocks are attended by the PyTorch reference, which is "
                    "much slower (build it: python -m vllm_kvshrink.kernels.cpu_ext build)",
                    cpu_ext.unavailable_reason())
    if impl == "reference":
        return reference(q, cache, layout, batch, scale)
    if impl == "cpu":  # checks once per batch itself
        from vllm_kvshrink.kernels import cpu_ext

        return cpu_ext.packed_attention(q, cache, layout, batch, scale)
    if impl == "triton":
        check(q, cache, layout, batch)
        from vllm_kvshrink.kernels import triton_packed

        return triton_packed.packed_attention(q, cache, layout, batch, scale)
    raise ValueError(f"impl={impl!r}; allowed: auto, reference, cpu, triton")
