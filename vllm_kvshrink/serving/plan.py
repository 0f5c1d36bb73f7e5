"""The one message that crosses from the scheduler to the workers each step.

The scheduler decides *when* a request is compacted and *how many* tokens it
keeps; the worker decides *which* tokens (it holds the keys and queries) and
moves them once the step's forward pass is done, then reports back, and only
then are blocks given back to the pool.  Both
sides agree on one fact per request: its offset, the number of logical tokens
no longer in the cache (``logical length - physical length``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Attribute of ``SchedulerOutput`` that carries a :class:`StepPlan`.
ATTR = "kvshrink_plan"


@dataclass
class Compaction:
    """Compact request ``req_id`` from ``old_len`` to ``keep`` cached tokens.

    ``block_ids`` is the request's new block list covering the kept tokens
    (``ceil(keep / block_size)`` blocks); it may differ from the first blocks
    of the old list where a block was shared and had to be copied on write.
    """

    req_id: str
    old_len: int
    keep: int
    logical_len: int
    block_ids: list[int]
    method: str
    sink_tokens: int
    recent_tokens: int
    pool_kernel: int = 7
    method_args: dict = field(default_factory=dict)


@dataclass
class TierEvent:
    """Re-assign the forms of tiered request ``req_id`` to fit ``budget_bytes``.

    The request holds ``old_len`` tokens in its plain (model dtype) row
    ``plain_blocks`` and the packed ``segments`` ``(block, form, n)``.  The
    worker reads all of them, runs the tier policy, and writes the result into
    ``dest_blocks`` (blocks the request owns alone, plus fresh ones): the plain
    tokens first, then one run of blocks per packed form.  It reports the
    request's new plain row and segments; the scheduler frees the rest.
    """

    req_id: str
    old_len: int
    logical_len: int
    plain_blocks: list[int]
    segments: list[tuple[int, str, int]]
    dest_blocks: list[int]
    budget_bytes: int
    storage: tuple[str, ...]
    method: str
    sink_tokens: int
    recent_tokens: int
    pool_kernel: int = 7
    method_args: dict = field(default_factory=dict)


@dataclass
class TierResult:
    """What a :class:`TierEvent` left: the plain row, the packed segments,
    tokens per level (of one (layer, head)), and tokens demoted (moved to a
    form with fewer bytes) and evicted, per (layer, head) on average."""

    plain_blocks: list[int]
    segments: list[tuple[int, str, int]]
    counts: dict[str, int]
    demoted: float
    evicted: float


@dataclass
class StepPlan:
    compactions: list[Compaction] = field(default_factory=list)
    tier_events: list[TierEvent] = field(default_factory=list)
    #: packed blocks given back to the pool since the last step (a request
    #: with packed blocks finished or was preempted): the worker zeroes them
    #: before this step's forward pass writes anything, since packed bytes
    #: read as the model dtype can be NaN and vLLM's kernel multiplies the
    #: unused slots of a block by zero.
    zero_blocks: list[int] = field(default_factory=list)
    #: req_id -> offset during this step's forward pass, for every running
    #: request with a non-zero offset.  Requests not listed have offset 0.
    #: This step's compactions run after the forward pass and change the
    #: offsets only from the next step on.
    offsets: dict[str, int] = field(default_factory=dict)
#: Attribute of ``ModelRunnerOutput`` with ``{req_id: True | TierResult | "error"}``.
RESULTS_ATTR = "kvshrink_results"
#: Attribute of ``ModelRunnerOutput`` with the worker's method statistics
#: (merged tokens, the temporal predictor's accuracy and training), cumulative.
METHOD_STATS_ATTR = "kvshrink_method_stats"
