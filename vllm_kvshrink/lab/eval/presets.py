"""Named evaluation presets: which methods, budgets and tasks one run covers.

Task kinds:

``ppl``
    A window of an Austen novel: ``context`` tokens of prompt, then
    ``continuation`` tokens teacher-forced ``forced_chunk`` at a time
    (compression runs between the forward passes).  Scored on the
    continuation: mean negative log-likelihood, and fidelity to the full
    cache on the same positions (top-1 agreement, KL(full || compressed),
    cosine of each layer's attention output).
``copy``
    Copy-back on the essays: a ``passage`` of one essay, ``filler`` tokens of
    other essays, then an instruction to repeat the passage; the passage is
    teacher-forced and scored by top-1 accuracy on its tokens.  The full-cache
    run also scores a control prompt in which another passage was shown, the
    task's chance level; the task is informative only where the full cache
    is well above it.
``engine_copy``
    The same copy-back prompts served by the real vLLM engine with the plugin
    (greedy generation, one engine run; each request picks its method and
    budget); scored by the longest common subsequence of generated and passage
    tokens over the passage length; the full cache also serves the control
    prompts, the chance level.
"""

from __future__ import annotations


class EvalError(ValueError):
    """A bad evaluation setting (the message names it, its value and what is
    allowed)."""


#: Baselines that are one of vLLM's own KV formats for the whole cache, not
#: a method: one cell per task (no budget), emulated in the research path
#: (:mod:`vllm_kvshrink.storage.vllm_formats`); ``fp8`` is also served for
#: real in the engine task.
STORAGE_BASELINES = ("fp8", "int8_per_token_head", "int4_per_token_head",
                     "turboquant_4bit_nc", "turboquant_k8v4")

#: ``uniform:<form>``: every token but the sinks and the recent window held
#: in one of our forms, nothing evicted (``uniform:int4`` is KIVI's scheme,
#: its full-precision residual being the recent window).
UNIFORM_PREFIX = "uniform:"


def row_args(spec: str) -> tuple[str, dict]:
    """``"temporal[online=true]/bf16,int4"`` -> ``("temporal/bf16,int4",
    {"online": True})``: a row's own method arguments, in brackets after the
    method name (values read as JSON, else as strings)."""
    import json

    head, slash, storage = spec.partition("/")
    name, bracket, rest = head.partition("[")
    if not bracket:
        return spec, {}
    if not rest.endswith("]"):
        raise EvalError(f"methods: {spec!r} has an unclosed '['; allowed: "
                        f"'<method>[key=value,...]/<forms>'")
    args = {}
    for item in filter(None, rest[:-1].split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise EvalError(f"methods: {spec!r}: {item!r} is not key=value")
        try:
            args[key.strip()] = json.loads(value)
        except ValueError:
            args[key.strip()] = value
    return name + slash + storage, args


#: Learned methods run with their shipped weights frozen, so that a cell's
#: numbers do not depend on which cells ran before it in the same process
#: (the temporal predictor is shared process-wide) and resuming is exact.
FROZEN_ARGS = {"online": False}


def method_args(row: str) -> dict:
    """A row's method arguments: learned methods frozen unless the row says
    otherwise (``temporal[online=true]``), then the row's own."""
    spec, own = row_args(row)
    frozen = "temporal" in spec or "semantic" in spec
    return {**(FROZEN_ARGS if frozen else {}), **own}


def parse_row(spec: str) -> tuple[str, str | None, str | None]:
    """An evaluation row -> ``(method, storage, store_form)``:

    * ``snapkv`` -- a method, eviction only;
    * ``temporal[online=true]`` -- a method with its own arguments
      (:func:`row_args`);
    * ``snapkv/bf16,int4_tok_rot`` -- a method as the tier policy's scorer
      over those forms, the budget in bf16 bytes;
    * ``uniform:int4`` -- one form for everything (see :data:`UNIFORM_PREFIX`);
    * ``int4_per_token_head`` etc. -- vLLM's formats (:data:`STORAGE_BASELINES`).
    """
    spec = row_args(spec)[0]
    if spec in STORAGE_BASELINES:
        return "none", None, spec
    if spec.startswith(UNIFORM_PREFIX):
        return "streaming", spec[len(UNIFORM_PREFIX):], None
    method, slash, storage = spec.partition("/")
    return method, (storage if slash else None), None


def unbudgeted(method: str) -> bool:
    """Rows without a budget: the reference, vLLM's formats, uniform forms."""
    return (method == "none" or method in STORAGE_BASELINES
            or method.startswith(UNIFORM_PREFIX))


#: Methods every table compares against (where they are part of the run).
BASELINES = ("none", "fp8", "int4_per_token_head", "streaming", "h2o", "snapkv", "tova",
             "knorm", "expected_attention", "minicache")

#: The scorers tiered storage is tried with, and the forms it may use
#: (sinks and the recent window always bf16).
TIER_SCORERS = ["snapkv", "tova", "h2o", "ema", "temporal", "expected_attention"]
TIER_FORMS = "bf16,int8_tok_rot,int4_tok_rot,int2_tok_rot"
TIERS_METHODS = (
    ["none", "fp8", "int8_per_token_head", "int4_per_token_head", "turboquant_4bit_nc",
     "uniform:int4", "uniform:int2", "uniform:int4_tok_rot",
     "streaming", "h2o", "snapkv", "tova", "ema", "temporal", "expected_attention",
     "snapkv/int4_tok_rot", "minicache"]
    + [f"{m}/{TIER_FORMS}" for m in TIER_SCORERS])

#: Our own contributions (the preset ``ours``): promotion from an offload
#: copy, the multi-scale form, adaptive selection, the temporal predictor
#: online, the semantic merger with the mass correction; every baseline row
#: of the tiers preset is reused from its files when present.
PROMOTE_FORMS = "bf16,int4_tok_rot,int2_tok_rot"
PROMOTE_SCORERS = ["snapkv", "temporal", "expected_attention"]
LOWRANK_FORMS = "bf16,int8_tok_rot,lr8_int4,int4_tok_rot,int2_tok_rot"
OURS_METHODS = (
    TIERS_METHODS
    + ["temporal[online=true]", f"temporal[online=true]/{TIER_FORMS}",
       "adaptive", f"adaptive/{TIER_FORMS}",
       "semantic", "semantic[mass_correction=true]",
       "uniform:lr8_int2", "uniform:lr8_int4", f"temporal/{LOWRANK_FORMS}"])
PROMOTE_TASK = {
    "name": "austen_1k_decode", "kind": "ppl", "context": 1024, "continuation": 192,
    "examples": 16, "corpus": "austen", "shared_prefill": True,
    "forced_chunk": 16, "slack_tokens": 16, "budgets": [0.125],
    "methods": ["none"] + [f"{m}{a}/{PROMOTE_FORMS}" for m in PROMOTE_SCORERS
                           for a in ("", "[offload=1.0]")]
               + [f"temporal[offload=0.25]/{PROMOTE_FORMS}",
                  f"temporal[online=true,offload=1.0]/{PROMOTE_FORMS}"]}

#: The issue's targets, checked in the report (:mod:`.contributions`): each
#: ``row`` against each ``baselines`` entry on the same examples, per task
#: and budget; ``want``: ``better`` (significantly lower nll) or
#: ``not_worse`` (no significantly higher nll).
OURS_TARGETS = (
    [{"name": "promotion", "task": "austen_1k_decode", "budgets": [0.125],
      "row": f"{m}[offload=1.0]/{PROMOTE_FORMS}", "baselines": [f"{m}/{PROMOTE_FORMS}"],
      "want": "better"} for m in PROMOTE_SCORERS]
    + [{"name": "temporal as the scorer", "row": r, "baselines": [b], "want": w}
       for r0 in ("temporal", "temporal[online=true]")
       for sfx in ("", f"/{TIER_FORMS}")
       for r, b, w in ((r0 + sfx, "ema" + sfx, "better"),
                       (r0 + sfx, "expected_attention" + sfx, "not_worse"))]
    + [{"name": "semantic merge", "row": r, "baselines": ["snapkv"], "want": "better"}
       for r in ("semantic", "semantic[mass_correction=true]")]
    + [{"name": "adaptive selection", "row": r, "baselines": b, "want": "not_worse"}
       for r, b in (("adaptive", ["snapkv", "expected_attention", "ema"]),
                    (f"adaptive/{TIER_FORMS}", [f"{m}/{TIER_FORMS}" for m in
                                                ("snapkv", "expected_attention", "ema")]))])

#: Rows the report places on the Pareto plot as on the frontier or dominated.
OURS_PARETO = ["uniform:lr8_int2", "uniform:lr8_int4", f"temporal/{LOWRANK_FORMS}",
               "adaptive", f"adaptive/{TIER_FORMS}"]

QUICK_METHODS = ["none", "fp8", "streaming", "h2o", "snapkv", "tova", "knorm", "ema", "temporal",
                 "semantic", "minicache"]

#: Long-text windows at 4k context, every method applied once after the
#: prompt's single forward pass (shared by every row of an example).
TIER_TASKS = [
    {"name": "austen_4k", "kind": "ppl", "context": 4096, "continuation": 128,
     "examples": 24, "corpus": "austen", "shared_prefill": True},
    {"name": "essays_4k", "kind": "ppl", "context": 4096, "continuation": 128,
     "examples": 24, "corpus": "essays", "shared_prefill": True},
]

PRESETS: dict[str, dict] = {
    # CI: two compressed methods, one budget, tiny examples.
    "smoke": {
        "methods": ["none", "streaming", "snapkv"],
        "budgets": [0.5],
        "tasks": [
            {"name": "austen_96", "kind": "ppl", "context": 96, "continuation": 16,
             "examples": 2},
            {"name": "copy_64", "kind": "copy", "passage": 12, "filler": 64,
             "examples": 2},
        ],
        "prefill_chunk": 64, "forced_chunk": 16, "slack_tokens": 16,
        "recent_tokens": 32, "block_size": 32, "n_boot": 500,
    },
    # About 190k tokens through the model (19 configurations per example): about
    # 6 minutes on two idle CPU cores, under 15 with the cores shared.
    "quick": {
        "methods": QUICK_METHODS,
        "budgets": [0.25, 0.5],
        "tasks": [
            {"name": "austen_512", "kind": "ppl", "context": 512, "continuation": 64,
             "examples": 4},
            {"name": "austen_1k", "kind": "ppl", "context": 1024, "continuation": 64,
             "examples": 4},
            {"name": "copy_1k", "kind": "copy", "passage": 48, "filler": 1024,
             "examples": 3},
        ],
        "prefill_chunk": 256, "forced_chunk": 32, "slack_tokens": 32,
        "recent_tokens": 32, "block_size": 32, "n_boot": 2000,
    },
    # The tiered-storage report in docs/results/eval/tiers/: vLLM's formats, uniform
    # forms, eviction, eviction + int4 and tiers with each scorer, 24 windows
    # of each corpus at 4k context, budgets 25% and 12.5% of the bf16 bytes.
    "tiers": {
        "methods": TIERS_METHODS,
        "budgets": [0.25, 0.125],
        "tasks": TIER_TASKS,
        "prefill_chunk": 512, "forced_chunk": 64, "slack_tokens": 64,
        "recent_tokens": 32, "block_size": 32, "n_boot": 2000,
    },
    # Our own contributions, docs/results/eval/ours/: the tiers preset's windows and
    # rows (reused from its files) plus ours, and a decode task whose events
    # recur every 32 tokens (promotion pays only when events recur).
    "ours": {
        "methods": OURS_METHODS,
        "budgets": [0.25, 0.125],
        "tasks": [PROMOTE_TASK] + [dict(t, examples=16) for t in TIER_TASKS],
        "targets": OURS_TARGETS, "pareto": OURS_PARETO,
        "prefill_chunk": 512, "forced_chunk": 64, "slack_tokens": 64,
        "recent_tokens": 32, "block_size": 32, "n_boot": 2000,
    },
    # The report in docs/results/eval/: every method at 4k context and 25% budget (the
    # headline comparison), budget curves at 1k, copy-back in the research path
    # and in the engine.  About 40 minutes on two idle CPU cores.
    "full": {
        "methods": QUICK_METHODS,
        "budgets": [0.125, 0.25, 0.5],
        "tasks": [
            {"name": "austen_4k", "kind": "ppl", "context": 4096, "continuation": 128,
             "examples": 8, "budgets": [0.25]},
            {"name": "austen_1k", "kind": "ppl", "context": 1024, "continuation": 128,
             "examples": 8},
            {"name": "copy_1k", "kind": "copy", "passage": 96, "filler": 1024,
             "examples": 8},
            {"name": "engine_copy_1k", "kind": "engine_copy", "passage": 96,
             "filler": 1024, "examples": 8, "budgets": [0.25, 0.5]},
        ],
        "prefill_chunk": 512, "forced_chunk": 64, "slack_tokens": 64,
        "recent_tokens": 32, "block_size": 32, "n_boot": 2000,
    },
}

#: Long texts a ``ppl`` task takes windows of.
CORPORA = ("austen", "essays")

KINDS = {
    "ppl": ("context", "continuation", "examples"),
    "copy": ("passage", "filler", "examples"),
    "engine_copy": ("passage", "filler", "examples"),
}

#: Per kind: the primary metric and whether higher is better.
PRIMARY = {"ppl": ("nll", False), "copy": ("copy_acc", True),
           "engine_copy": ("copy_acc", True)}

#: Every per-example metric and whether higher is better.
METRICS = {"nll": False, "copy_acc": True, "top1_agree": True, "kl": False,
           "attn_cos": True, "kv_mean_ratio": False, "kv_peak_ratio": False}

#: Rows with promotion also report their offload copy apart from the
#: resident bytes: its mean bytes over the full cache's, and the bytes read
#: back per scored token (originals of promoted tokens; offloaded keys the
#: scorer reads), each over one token's bf16 K+V of the whole model.
OFFLOAD_METRICS = ("offload_mean_ratio", "promoted_per_token", "scan_per_token")


def check_task(task: dict) -> dict:
    """A task spec, checked: clear errors naming the field, value and allowed."""
    if not isinstance(task, dict) or "kind" not in task or "name" not in task:
        raise EvalError(f"task {task!r} needs 'name' and 'kind'; allowed kinds: "
                         f"{', '.join(KINDS)}")
    kind = task["kind"]
    if kind not in KINDS:
        raise EvalError(f"task {task['name']!r}: kind={kind!r} is not known; allowed: "
                         f"{', '.join(KINDS)}")
    corpus = task.get("corpus", "austen")
    if kind == "ppl" and corpus not in CORPORA:
        raise EvalError(f"task {task['name']!r}: corpus={corpus!r} is not known; "
                         f"allowed: {', '.join(CORPORA)}")
    for field in KINDS[kind]:
        v = task.get(field)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EvalError(f"task {task['name']!r}: {field}={v!r} is out of range; "
                             f"allowed: a whole number >= 1")
    for field, low in TASK_SETTINGS.items():
        v = task.get(field, low)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise EvalError(f"task {task['name']!r}: {field}={v!r} is out of range; "
                             f"allowed: a whole number >= {low}")
    return task


#: Settings a task may set for itself (over the preset's), with their least
#: allowed value: a task whose events recur while it is scored (promotion
#: pays only then) compresses every few tokens.
TASK_SETTINGS = {"forced_chunk": 1, "slack_tokens": 0}
