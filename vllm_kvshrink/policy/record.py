"""The event record: one JSON line per compression event, written by the
engine's worker (with ``VLLM_KVSHRINK_RECORD_DIR``) and returned by the
research path, read by the replays (:mod:`vllm_kvshrink.lab.hf.replay`,
:mod:`vllm_kvshrink.lab.hf.replay_tiers`) and the agreement benchmark.

Fields of every event:

* ``logical_len`` -- tokens the request had seen at the event;
* ``old_len`` -- tokens it held before, ``keep`` -- tokens per (layer, KV
  head) it holds after;
* ``method`` -- the importance method;
* ``kept`` -- ``[L, Hkv, keep]`` logical position of each held token, cache
  order.

A tier event adds ``level`` (``[L, Hkv, keep]`` index into ``storage`` of
each held token's form), ``storage`` (the forms, ``bf16`` first),
``counts`` (tokens per (layer, head) in each form), ``bytes`` (exact bytes
held) and ``budget_bytes``.  The engine adds ``req_id`` and ``epoch`` (times
the request was preempted and recomputed); a preemption writes a marker
``{"req_id", "restart_at", "epoch"}`` whose ``restart_at`` is the index of the
new epoch's first sampled token.

Under tensor parallelism each rank writes the records of its own KV heads,
tagged ``tp_rank`` and ``tp_size``; the readers here merge them into one
record over every head (rank order, as vLLM splits them), so a TP engine's
records read like the single-rank engine's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: files one engine process writes its records to (one per process id)
RECORD_GLOB = "events-*.jsonl"


def eviction_record(logical_len: int, old_len: int, keep: int, method: str,
                    kept: list) -> dict:
    """The record of an eviction event; ``kept`` ``[L, Hkv, keep]`` logical
    positions (nested lists)."""
    return {"logical_len": logical_len, "old_len": old_len, "keep": keep,
            "method": method, "kept": kept}


def tier_record(logical_len: int, old_len: int, keep: int, method: str, kept: list,
                level: list, storage, counts: list[int], nbytes: int,
                budget_bytes: int) -> dict:
    """The record of a tier event; ``kept`` and ``level`` ``[L, Hkv, keep]``
    (nested lists, cache order), ``storage`` the forms ``level`` indexes."""
    rec = eviction_record(logical_len, old_len, keep, method, kept)
    rec.update({"storage": list(storage), "counts": list(counts), "level": level,
                "bytes": nbytes, "budget_bytes": budget_bytes})
    return rec


def restart_record(req_id: str, restart_at: int) -> dict:
    """The marker of a preemption: the request's next epoch samples its first
    token at index ``restart_at``."""
    return {"req_id": req_id, "restart_at": restart_at}


def append_record(record_dir: str, record: dict) -> None:
    """Append ``record`` as one line to this process's record file in
    ``record_dir``."""
    os.makedirs(record_dir, exist_ok=True)
    path = os.path.join(record_dir, f"events-{os.getpid()}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def external_id(req_id: str) -> str:
    """The id a caller gave a request: vLLM appends ``-<8 hex>`` to it."""
    return req_id.rsplit("-", 1)[0]


def _lines(record_dir: str | Path, external_ids: bool):
    """``(request key, record)`` of every line of every record file, the
    ranks' records of one event merged (:func:`merge_ranks`); with
    ``external_ids`` the key is the caller's id (:func:`external_id`)."""
    lines, ranked = [], {}
    for path in sorted(Path(record_dir).glob(RECORD_GLOB)):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            if e.get("tp_size", 1) > 1:
                what = ("restart_at", e["restart_at"]) if "restart_at" in e \
                    else ("logical_len", e["logical_len"])
                ident = (e["req_id"], e.get("epoch", 0), what)
                if ident not in ranked:
                    ranked[ident] = []
                    lines.append(ident)
                ranked[ident].append(e)
            else:
                lines.append(e)
    for e in lines:
        if isinstance(e, tuple):
            e = merge_ranks(ranked[e])
        yield (external_id(e["req_id"]) if external_ids else e["req_id"]), e


#: per-(layer, KV head) fields of a record: ``[L, Hkv, ...]`` nested lists
HEAD_FIELDS = ("kept", "level")


def merge_ranks(parts: list[dict]) -> dict:
    """One record over every KV head from the tensor-parallel ranks' records
    of the same event (each ``[L, Hkv / tp_size, ...]``): heads concatenated
    in rank order, bytes summed; every other field must agree."""
    size = parts[0]["tp_size"]
    by_rank = {p["tp_rank"]: p for p in parts}
    if sorted(by_rank) != list(range(size)) or len(parts) != size:
        raise ValueError(f"event of {parts[0]['req_id']!r} recorded by tensor-parallel "
                         f"ranks {sorted(p['tp_rank'] for p in parts)} of {size}")
    ordered = [by_rank[r] for r in range(size)]
    out = {k: v for k, v in ordered[0].items() if k not in ("tp_rank", "tp_size")}
    for k, v in out.items():
        if k in HEAD_FIELDS or k == "bytes":
            continue
        if any(p.get(k) != v for p in ordered[1:]):
            raise ValueError(f"tensor-parallel ranks disagree on {k!r} in an event of "
                             f"{out['req_id']!r}: {[p.get(k) for p in ordered]}")
    for k in HEAD_FIELDS:
        if k in out:
            out[k] = [sum((p[k][layer] for p in ordered), [])
                      for layer in range(len(out[k]))]
    if "bytes" in out:
        out["bytes"] = sum(p["bytes"] for p in ordered)
    return out


def load_events(record_dir: str | Path, external_ids: bool = True) -> dict[str, list[dict]]:
    """``req_id -> events`` (by logical length) from every record file;
    preemption markers are left out (see :func:`load_epochs`)."""
    events: dict[str, list[dict]] = {}
    for key, e in _lines(record_dir, external_ids):
        if "restart_at" in e:
            continue
        events.setdefault(key, []).append(e)
    return {key: by_logical_len(evs) for key, evs in events.items()}


def load_epochs(record_dir: str | Path, external_ids: bool = True) -> dict[str, list[dict]]:
    """``req_id -> epochs``: a request preempted ``n`` times was computed
    ``n + 1`` times from scratch, each time with its own events.  Each epoch is
    ``{"start": index of its first sampled token (None: the prompt's end),
    "events": [...]}``; the tokens sampled in an epoch are replayed with its
    events alone."""
    out: dict[str, list[dict]] = {}
    for key, e in _lines(record_dir, external_ids):
        epochs = out.setdefault(key, [{"start": None, "events": []}])
        n = e.get("epoch", 0)
        while len(epochs) <= n:
            epochs.append({"start": None, "events": []})
        if "restart_at" in e:
            epochs[n]["start"] = e["restart_at"]
        else:
            epochs[n]["events"].append(e)
    for epochs in out.values():
        for ep in epochs:
            ep["events"] = by_logical_len(ep["events"])
    return out


def by_logical_len(events) -> list[dict]:
    """``events`` in the order they happened (by logical length)."""
    return sorted(events, key=lambda e: e["logical_len"])
