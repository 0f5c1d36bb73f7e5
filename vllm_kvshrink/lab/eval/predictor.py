"""How well do the importance signals predict the attention to come?

``python -m vllm_kvshrink.lab.eval.predictor --out DIR`` reads Austen windows
(text the predictor's warm-up never saw) with the full cache and, at event
times every ``--every`` tokens, asks each signal to rank the cached tokens by
the attention they will receive from the next ``--horizon`` queries (mean over
them), per layer and KV head:

* ``temporal`` -- the shipped TemporalImportancePredictor;
* ``ema`` -- its simple twin (moving average of received attention);
* ``window`` -- the attention of the last ``OBS_WINDOW`` queries, summed
  (SnapKV's signal before pooling);
* ``expected_attention`` -- Expected Attention's score (the method itself,
  from the same window of queries, the keys, values and RoPE frequencies).

Metrics: recall@10% (share of the truly most-attended tokens found in the
predicted top 10%) and Spearman's rank correlation, averaged over events,
layers and heads -- one value per example, compared pairwise with the
Wilcoxon signed-rank test and a bootstrap interval (vllm_kvshrink.lab.eval.stats).
Writes ``DIR/predictor.json`` and ``DIR/predictor.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIGNALS = ("temporal", "ema", "window", "expected_attention")


def example_ids(tok, n: int, length: int, seed: int) -> list[list[int]]:
    from vllm_kvshrink.lab.assets import load_austen

    books = load_austen()
    titles = sorted(books)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        text = books[titles[i % len(titles)]]
        start = int(rng.integers(0, len(text) - length * 8))
        start = text.find("\n", start) + 1
        out.append(tok(text[start:start + length * 8], add_special_tokens=False)
                   ["input_ids"][:length])
    return out


def _full_pass(model, ids):
    """Attention ``[L, H, T, T]`` (GQA-group mean), keys, values ``[L, H, T,
    D]``, every query ``[L, Hq, T, D]``, scales and RoPE frequencies of one
    full-cache pass."""
    from vllm_kvshrink.config import KVShrinkConfig
    from vllm_kvshrink.lab.hf.research import ResearchRunner

    runner = ResearchRunner(model, KVShrinkConfig(obs_window=len(ids), recent_tokens=len(ids)))
    attn: dict[int, torch.Tensor] = {}
    res = runner.run(ids, on_attention=lambda li, p: attn.__setitem__(li, p.mean(dim=1)))
    c = res.cache
    queries = torch.stack([q for _, q in c.qring], dim=2)
    return (torch.stack([attn[i] for i in range(runner.num_layers)]), torch.stack(c.keys),
            torch.stack(c.values), queries, list(c.scales),
            runner._inv_freq(c.keys[0].shape[-1]))


def _expected_attention(keys, values, queries, scales, inv_freq, t: int) -> torch.Tensor:
    """Expected Attention's scores ``[L, H, t]`` of keys ``0..t-1`` from the
    ``HISTORY`` queries before ``t``."""
    from vllm_kvshrink.methods.base import Observation
    from vllm_kvshrink.methods.expected_attention import ExpectedAttention
    from vllm_kvshrink.methods.temporal import HISTORY

    obs = Observation(keys[:, :, :t], queries[:, :, t - HISTORY:t],
                      torch.arange(t - HISTORY, t), scales, values[:, :, :t],
                      rope_inv_freq=inv_freq)
    return ExpectedAttention().score_layers(obs, {})


def score_example(model, ids, predictor, horizon: int, every: int) -> dict:
    from vllm_kvshrink.lab.hf.warmup import event_batch
    from vllm_kvshrink.methods.temporal import HISTORY, ranking_accuracy

    attn, keys, values, queries, scales, inv_freq = _full_pass(model, ids)
    n = attn.shape[-1]
    acc = {s: {"recall": [], "spearman": []} for s in SIGNALS}
    for t in range(max(256, HISTORY + 64), n - horizon, every):
        hist, static, target, twin = event_batch(attn, t, horizon)
        pred = predictor.predict(hist.reshape(-1, HISTORY),
                                 static.reshape(-1, static.shape[-1])).view(target.shape)
        window = attn[:, :, t - HISTORY:t, :t].sum(dim=2)
        ea = _expected_attention(keys, values, queries, scales, inv_freq, t)
        truth = target.reshape(-1, t)
        for name, s in (("temporal", pred), ("ema", twin), ("window", window),
                        ("expected_attention", ea)):
            r, rho = ranking_accuracy(s.reshape(-1, t), truth)
            acc[name]["recall"].append(r)
            acc[name]["spearman"].append(rho)
    return {f"{s}_{m}": float(np.mean(v)) for s, d in acc.items() for m, v in d.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--horizon", type=int, default=16)
    ap.add_argument("--every", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvshrink.lab.assets import default_model_path
    from vllm_kvshrink.lab.eval import stats
    from vllm_kvshrink.methods.temporal import DEFAULT_WEIGHTS, SharedPredictor

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    predictor = SharedPredictor(DEFAULT_WEIGHTS)
    rows = []
    t0 = time.time()
    for i, ids in enumerate(example_ids(tok, args.examples, args.tokens, args.seed)):
        rows.append(score_example(model, ids, predictor, args.horizon, args.every))
        print(f"[predictor] example {i + 1}/{args.examples}: "
              + ", ".join(f"{k}={v:.3f}" for k, v in rows[-1].items())
              + f" ({time.time() - t0:.0f}s)", flush=True)
    summary = {k: stats.bootstrap_ci([r[k] for r in rows], seed=args.seed)
               for k in rows[0]}
    comparisons = []
    for metric in ("recall", "spearman"):
        for base in ("ema", "window", "expected_attention"):
            res = stats.compare([r[f"temporal_{metric}"] for r in rows],
                                [r[f"{base}_{metric}"] for r in rows], True,
                                seed=args.seed)
            comparisons.append({"metric": metric, "baseline": base, **res})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "model": Path(path).name, "weights": str(DEFAULT_WEIGHTS.name),
            "examples": args.examples, "tokens": args.tokens, "horizon": args.horizon,
            "every": args.every, "seed": args.seed,
            "command": "python -m vllm_kvshrink.lab.eval.predictor " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    (out / "predictor.json").write_text(json.dumps(
        {"meta": meta, "examples": rows, "summary": summary,
         "comparisons": comparisons}, indent=2))
    lines = ["# Importance signals vs the attention to come (full cache)", "",
             f"Command: `{meta['command']}`; model {meta['model']}"
             + (" as embedded (Q4_1 GGUF dequantized)" if meta['model'] == "SmolLM2-135M-Instruct"
                else "") + ", fp32; "
             f"{args.examples} Austen windows of {args.tokens} tokens; an event every "
             f"{args.every} tokens; truth = mean attention of the next {args.horizon} "
             f"queries, per layer and KV head.", "",
             "| signal | recall@10% (95% CI) | Spearman (95% CI) |", "|---|---|---|"]
    for s in SIGNALS:
        r, rho = summary[f"{s}_recall"], summary[f"{s}_spearman"]
        lines.append(f"| {s} | {r['mean']:.3f} ({r['lo']:.3f}-{r['hi']:.3f}) | "
                     f"{rho['mean']:.3f} ({rho['lo']:.3f}-{rho['hi']:.3f}) |")
    lines += ["", "Paired tests, `temporal` against each baseline (Wilcoxon signed-rank, "
              "n = examples):", "",
              "| metric | baseline | mean diff 95% CI | p | effect (rank-biserial) | verdict |",
              "|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['metric']} | {c['baseline']} | {c['diff_ci'][0]:+.3f} to "
                     f"{c['diff_ci'][1]:+.3f} | {c['p_value']:.4f} | "
                     f"{c['rank_biserial']:+.2f} | {c['verdict']} |")
    (out / "predictor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
