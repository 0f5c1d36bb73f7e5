"""What attention needs from the worker for one forward pass.

The model-runner patch builds one :class:`StepContext` per step (in
``_prepare_inputs``, from the step plan and the batch) and hands it to
attention on the attention metadata vLLM builds for that step, under the
attribute :data:`ATTR` (``_build_attention_metadata``).  vLLM builds new
metadata objects for every forward pass and gives each layer's attention its
own through the forward context, so the context lives exactly as long as the
step: attention reads it with :func:`of` and reaches nothing else of the
worker.  Forward passes outside a step (vLLM's profiling and warm-up runs)
carry ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm_kvshrink.kernels.packed_batch import PackedBatch

#: Attribute of vLLM's per-step attention metadata holding the step's context.
ATTR = "kvshrink_step"


def no_timing(phase: str, seconds: float) -> None:
    """The timing sink of a context that keeps no time."""


@dataclass(frozen=True)
class StepContext:
    """One step's instructions to attention (either part may be ``None``)."""

    #: ``capture(layer_name, query)``: keep the observation-window rows of one
    #: layer's queries ``[T, Hq * D]`` (the step's flattened batch, padding
    #: cut off) in the worker's query ring
    capture: Callable[[str, torch.Tensor], None] | None
    #: the step's requests holding packed blocks (tiered storage): their rows
    #: of the attention output are computed over plain and packed tokens
    packed: PackedBatch | None
    #: the plain cache's layout as the packed-attention kernel takes it (a
    #: strided layout's name, or an ``IndexMap``); read with ``packed`` only
    packed_layout: object = None
    #: ``timing(phase, seconds)``: where attention counts the seconds of its
    #: phases (``capture``, ``packed_attention``; see
    #: :mod:`~vllm_kvshrink.serving.metrics.phases`)
    timing: Callable[[str, float], None] = no_timing


def attach(attn_metadata, step: StepContext | None) -> None:
    """Put ``step`` on every metadata object of one forward pass
    (``{layer_name: metadata}``, or one such dict per micro-batch); layers of
    one group share an object."""
    groups = attn_metadata if isinstance(attn_metadata, list) else [attn_metadata]
    for per_layer in groups:
        for md in per_layer.values():
            setattr(md, ATTR, step)


def of(attn_metadata) -> StepContext | None:
    """The step context on one layer's attention metadata (``None``: none)."""
    return getattr(attn_metadata, ATTR, None)
