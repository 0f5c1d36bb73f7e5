"""Soak of ``vllm serve`` with the plugin: many streaming clients, mixed
requests, disconnects, opt-outs, per-request budgets and invalid requests, then
checks that nothing leaked and that uncompressed requests equal stock.

Used by ``tests/serve/test_soak.py`` (small) and ``benchmarks/soak_serve.py`` (large).

Comparing with stock: the engine's arithmetic depends on the batch a request
shares (matmul shapes), so two servers -- even two stock ones -- under
concurrency may pick different greedy tokens where the top two logits are
nearly equal.  The comparison therefore asks for the top-2 logprobs of every
token and accepts a difference only at a near-tie of both servers (gap below
``tie_margin``); anything else is a real difference.  It runs in fp32 by
default, where such ties are rare.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

from vllm_kvshrink.lab.bench.server import Server, metric, parse_metrics

KINDS = ("normal", "optout", "budget", "disconnect", "bad_args", "too_long")


@dataclass
class SoakRequest:
    idx: int
    kind: str
    prompt: str
    max_tokens: int
    xargs: dict | None = None
    disconnect_after: int = 0  # chunks


@dataclass
class SoakResult:
    status: int
    kind: str
    tokens: list = field(default_factory=list)
    tops: list = field(default_factory=list)  # per token: {token: logprob}
    error: str = ""
    disconnected: bool = False
    seconds: float = 0.0


def build_requests(tokenizer, n: int, seed: int, too_long_tokens: int,
                   min_len: int = 32, max_len: int = 700) -> list[SoakRequest]:
    """``n`` seeded requests of real essay text; every kind appears at least
    once (shares: 10% opt-out, 10% own budget, 15% disconnect, 5% bad
    arguments, 3% too long, the rest normal)."""
    from vllm_kvshrink.lab.bench.workload import build_workload

    rng = random.Random(seed)
    windows = build_workload(tokenizer, n, min_len, max_len, seed)
    (long_ids,) = build_workload(tokenizer, 1, too_long_tokens, too_long_tokens, seed + 1)
    shares = [("optout", 0.10), ("budget", 0.10), ("disconnect", 0.15),
              ("bad_args", 0.05), ("too_long", 0.03)]
    kinds = []
    for kind, share in shares:
        kinds += [kind] * max(1, round(share * n))
    kinds += ["normal"] * (n - len(kinds))
    rng.shuffle(kinds)
    out = []
    for i, (kind, ids) in enumerate(zip(kinds, windows)):
        r = SoakRequest(i, kind, tokenizer.decode(ids), rng.randint(8, 48))
        if kind == "optout":
            r.xargs = {"kvshrink_method": "none"}
        elif kind == "budget":
            r.xargs = {"kvshrink_budget": rng.choice([0.5, 0.75, 96])}
        elif kind == "disconnect":
            r.max_tokens = 48
            r.disconnect_after = rng.randint(1, 4)
        elif kind == "bad_args":
            r.xargs = rng.choice([{"kvshrink_budget": 7.5}, {"kvshrink_method": "h2oo"},
                                  {"kvshrink_sink_tokens": -1}])
            r.max_tokens = 4
        elif kind == "too_long":  # cannot fit the pool uncompressed
            r.prompt = tokenizer.decode(long_ids)
            r.xargs = {"kvshrink_method": "none"}
        out.append(r)
    return out


async def _one(client, url: str, model: str, req: SoakRequest, logprobs: bool
               ) -> SoakResult:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "return_tokens_as_token_ids": True}
    if logprobs:
        body["logprobs"] = 2
    if req.xargs:
        body["vllm_xargs"] = req.xargs
    t0 = time.perf_counter()
    res = SoakResult(status=0, kind=req.kind)
    async with client.stream("POST", url + "/v1/completions", json=body,
                             timeout=900) as r:
        res.status = r.status_code
        if r.status_code != 200:
            res.error = (await r.aread()).decode(errors="replace")
            res.seconds = time.perf_counter() - t0
            return res
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data.strip() == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:  # an error inside the stream
                err = obj["error"]
                res.status = int(err.get("code") or 500) if isinstance(err, dict) else 500
                res.error = json.dumps(err)
                break
            choice = obj["choices"][0]
            lp = choice.get("logprobs")
            if lp:
                res.tokens += lp["tokens"]
                res.tops += lp["top_logprobs"]
            chunks += 1
            if req.disconnect_after and chunks >= req.disconnect_after:
                res.disconnected = True
                break  # leaving the block closes the connection mid-stream
    res.seconds = time.perf_counter() - t0
    return res


async def _drive(url: str, model: str, reqs: list[SoakRequest], clients: int,
                 logprobs: bool, progress: bool) -> dict[int, SoakResult]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    results: dict[int, SoakResult] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client):
        while True:
            try:
                req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results[req.idx] = await _one(client, url, model, req, logprobs)
            if progress and len(results) % 20 == 0:
                print(f"  {len(results)}/{len(reqs)} requests done", flush=True)

    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return results


def drive(server: Server, reqs: list[SoakRequest], clients: int, logprobs: bool = True,
          progress: bool = False) -> dict[int, SoakResult]:
    """Send ``reqs`` from ``clients`` concurrent streaming clients."""
    return asyncio.run(_drive(server.url, server.model, reqs, clients, logprobs, progress))


def settle(server: Server, timeout: float = 60) -> str:
    """Wait until no request runs or waits and the KV cache is empty; the
    final ``/metrics`` text (raises if it never settles: a leak)."""
    deadline = time.time() + timeout
    while True:
        text = server.metrics()
        m = parse_metrics(text)
        busy = (m.get("vllm:num_requests_running", 0.0)
                + m.get("vllm:num_requests_waiting", 0.0))
        usage = m.get("vllm:kv_cache_usage_perc", 0.0)
        if busy == 0 and usage == 0:
            return text
        if time.time() > deadline:
            raise AssertionError(f"server did not settle: {busy:.0f} requests busy, "
                                 f"KV usage {usage:.4f} (leaked blocks?)")
        time.sleep(1)


def first_difference(a: SoakResult, b: SoakResult, tie_margin: float) -> dict | None:
    """``None`` when ``a`` and ``b`` sampled the same tokens, or differ first
    where both servers' top-2 logprobs were within ``tie_margin`` (a near-tie
    the batch's arithmetic may break either way); else where and by how much."""
    for i, (ta, tb) in enumerate(zip(a.tokens, b.tokens)):
        if ta == tb:
            continue
        gaps = []
        for res in (a, b):
            vals = sorted(res.tops[i].values(), reverse=True) if i < len(res.tops) else []
            gaps.append(vals[0] - vals[1] if len(vals) >= 2 else float("inf"))
        if max(gaps) < tie_margin:
            return None
        return {"index": i, "ours": ta, "stock": tb, "gaps": gaps}
    if len(a.tokens) != len(b.tokens):
        return {"index": min(len(a.tokens), len(b.tokens)), "lengths":
                [len(a.tokens), len(b.tokens)]}
    return None


def check(reqs: list[SoakRequest], ours: dict[int, SoakResult], final_metrics: str,
          stock: dict[int, SoakResult] | None, tie_margin: float) -> dict:
    """Every check of the soak; returns a summary (raises AssertionError with
    what failed)."""
    problems = []
    by_kind: dict[str, int] = {}
    for r in reqs:
        by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
        res = ours[r.idx]
        if r.kind in ("bad_args", "too_long"):
            want = "does not fit the KV pool" if r.kind == "too_long" else "kvshrink"
            if res.status != 400 or want not in res.error:
                problems.append(f"request {r.idx} ({r.kind}): status {res.status}, "
                                f"error {res.error[:200]!r}")
        elif res.status != 200:
            problems.append(f"request {r.idx} ({r.kind}): status {res.status} "
                            f"{res.error[:300]!r}")
        elif not res.disconnected and len(res.tokens) != r.max_tokens:
            problems.append(f"request {r.idx}: {len(res.tokens)} of {r.max_tokens} tokens")
    completed = sum(1 for r in reqs if ours[r.idx].status == 200
                    and not ours[r.idx].disconnected)
    disconnected = sum(1 for r in reqs if ours[r.idx].disconnected)
    length = metric(final_metrics, "vllm:request_success_total", finished_reason="length")
    # Every completed request finished by length (ignore_eos); a disconnected
    # stream is aborted (vLLM does not count aborts there) unless it finished
    # before the server noticed.
    if not completed <= length <= completed + disconnected:
        problems.append(f"request_success_total{{finished_reason=length}} = "
                        f"{length:.0f}, expected {completed} completed (+ at most "
                        f"{disconnected} disconnected)")
    compactions = metric(final_metrics, "vllm:kvshrink_compactions_total")
    fallbacks = metric(final_metrics, "vllm:kvshrink_fallbacks_total")
    if compactions <= 0:
        problems.append("no compaction happened")
    if fallbacks != 0:
        problems.append(f"{fallbacks:.0f} fallbacks")
    compared = ties = 0
    diffs = []
    if stock is not None:
        for r in reqs:
            if r.kind != "optout":
                continue
            a, b = ours[r.idx], stock[r.idx]
            compared += 1
            exact = a.tokens == b.tokens
            d = first_difference(a, b, tie_margin)
            if d is not None:
                diffs.append({"request": r.idx, **d})
            elif not exact:
                ties += 1
        if diffs:
            problems.append(f"opted-out requests differ from stock beyond a near-tie: "
                            f"{diffs[:3]}")
    summary = {"requests": len(reqs), "by_kind": by_kind, "completed": completed,
               "disconnected": disconnected,
               "disconnected_finished_first": length - completed,
               "compactions": compactions, "fallbacks": fallbacks,
               "tokens_evicted": metric(final_metrics, "vllm:kvshrink_tokens_evicted_total"),
               "optout_compared": compared, "optout_near_ties": ties,
               "problems": problems}
    if problems:
        raise AssertionError("soak failed:\n  " + "\n  ".join(problems))
    return summary

