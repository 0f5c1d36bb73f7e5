"""Offline warm-up of the learned parts on real text with full attention.

``python -m vllm_kvshrink.lab.hf.warmup --out DIR`` runs the model over essay
passages with the full cache, takes every layer's attention, and trains

* the temporal predictor: at random event times ``t``, the history is the
  attention from the ``T`` queries before ``t``, the label the mean attention
  from the next ``horizon`` queries (the same quantities the engine sees
  online);
* the semantic merger's key embedding: InfoNCE where tokens with similar
  attention profiles are positives.

It writes ``temporal.pt`` and ``semantic.pt`` (the files shipped in
``vllm_kvshrink/methods/weights/`` come from this command on the essays; the
evaluation uses Jane Austen's novels, which the warm-up never sees).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vllm_kvshrink.methods.ema import ema_update
from vllm_kvshrink.methods.semantic import SharedEmbedding
from vllm_kvshrink.methods.temporal import (
    HISTORY,
    SharedPredictor,
    features,
    ranking_accuracy,
    target_of,
)


@torch.no_grad()
def full_attention(model, ids: list[int]):
    """Per layer ``[Hkv, T, T]`` attention (GQA-group mean) and keys
    ``[L, Hkv, T, D]`` of one full-cache forward pass."""
    from vllm_kvshrink.config import KVShrinkConfig
    from vllm_kvshrink.lab.hf.research import ResearchRunner

    runner = ResearchRunner(model, KVShrinkConfig())  # method none: the full cache
    attn: dict[int, torch.Tensor] = {}
    res = runner.run(ids, on_attention=lambda li, p: attn.__setitem__(li, p.mean(dim=1)))
    return (torch.stack([attn[i] for i in range(runner.num_layers)]),
            torch.stack(res.cache.keys))


def event_batch(attn: torch.Tensor, t: int, horizon: int, decay: float = 0.9,
                history: int = HISTORY):
    """Features and labels of an event at time ``t`` (keys ``0..t-1``).

    ``attn`` ``[L, H, T, T]``.  Returns ``hist [L,H,t,T]``, ``static``,
    ``target [L,H,t]``.
    """
    past = attn[:, :, :t, :t]
    window = past[:, :, t - history:]  # [L, H, T, t]
    ema = torch.zeros(attn.shape[0], attn.shape[1], t)
    lead = past[:, :, max(0, t - history - 64): t - history]
    ema = ema_update(ema, lead, decay)
    twin = ema_update(ema, window, decay)  # what the `ema` method would score
    hist, static = features(window, ema, t - history, ema_now=twin)
    future = attn[:, :, t:t + horizon, :t].mean(dim=2)
    return hist, static, target_of(future, t), twin


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for temporal.pt and semantic.pt")
    ap.add_argument("--model", default="", help="model path (default: the embedded one)")
    ap.add_argument("--docs", type=int, default=6, help="essay passages to use")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per passage")
    ap.add_argument("--steps", type=int, default=400, help="AdamW steps per model")
    ap.add_argument("--horizon", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvshrink.lab.assets import default_model_path, load_essays

    path = args.model or default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    essays = load_essays()
    g = torch.Generator().manual_seed(args.seed)
    data = []
    t0 = time.time()
    # Essays 20.. : the tests and the evaluation use the first ones.
    for i in range(args.docs):
        ids = tok(essays[20 + i], add_special_tokens=False)["input_ids"][: args.tokens]
        attn, keys = full_attention(model, ids)
        data.append((attn, keys))
        print(f"[warmup] passage {i + 1}/{args.docs}: {len(ids)} tokens "
              f"({time.time() - t0:.0f}s)", flush=True)
    out = Path(args.out)
    pred = SharedPredictor(lr=2e-3, seed=args.seed)
    emb = SharedEmbedding(data[0][1].shape[-1], lr=2e-3, seed=args.seed)
    held = data[-1]
    for step in range(args.steps):
        attn, keys = data[int(torch.randint(0, len(data) - 1, (1,), generator=g))]
        n = attn.shape[-1]
        t = int(torch.randint(HISTORY + 64, n - args.horizon, (1,), generator=g))
        hist, static, target, _ = event_batch(attn, t, args.horizon)
        rows = torch.randperm(target.numel(), generator=g)[:4096]
        loss = pred.train_step(hist.reshape(-1, HISTORY)[rows],
                               static.reshape(-1, static.shape[-1])[rows], target.reshape(-1)[rows])
        prof = attn[:, :, t - HISTORY:t, :t].permute(0, 1, 3, 2)
        closs = emb.contrastive_step(keys[:, :, :t], prof)
        if step % 50 == 0 or step == args.steps - 1:
            ha, _ = held
            hn = ha.shape[-1]
            hh, hs, ht, twin = event_batch(ha, hn - 2 * args.horizon, args.horizon)
            p = pred.predict(hh.reshape(-1, HISTORY), hs.reshape(-1, hs.shape[-1])).view(ht.shape)
            recall, rho = ranking_accuracy(p.reshape(-1, ht.shape[-1]),
                                           ht.reshape(-1, ht.shape[-1]))
            er, erho = ranking_accuracy(twin.reshape(-1, ht.shape[-1]),
                                        ht.reshape(-1, ht.shape[-1]))
            print(f"[warmup] step {step}: predictor loss {loss:.4f}, held-out "
                  f"recall@10% {recall:.3f} (ema twin {er:.3f}), spearman {rho:.3f} "
                  f"(ema twin {erho:.3f}); embedding loss {closs:.3f}", flush=True)
    meta = {"source": "vllm_kvshrink.lab.hf.warmup", "model": Path(path).name,
            "docs": args.docs, "tokens": args.tokens, "steps": args.steps,
            "horizon": args.horizon}
    pred.save(out / "temporal.pt", **meta)
    emb.save(out / "semantic.pt", **meta)
    print(f"[warmup] wrote {out / 'temporal.pt'} and {out / 'semantic.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
