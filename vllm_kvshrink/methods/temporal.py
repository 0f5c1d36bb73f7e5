"""Temporal importance predictor: learns, online, which tokens will be attended.

A small transformer reads each cached token's recent attention history -- the
attention it received from each query of the observation window, oldest
first, with learned temporal position embeddings -- plus a summary token
(its long-run moving average of attention, its age in the cache, whether it
has history), and predicts ``log1p(N * a_future)``: the attention it will
receive, on average, from the queries that arrive before the next event.
Eviction keeps the tokens with the highest predictions.

Training is online: at each event the labels for the previous event's
predictions have arrived (the attention the kept tokens received from the new
queries), so one AdamW step (gradient clipping at 1.0) is taken on a sample of
them.  The weights are shared by every request in the process, can be saved
and loaded, and can be warmed up offline on real text with full attention
(``python -m vllm_kvshrink.lab.hf.warmup``).  Its accuracy -- recall@k of the
tokens that really receive the most attention next, and Spearman rank
correlation -- is measured at every event and exported.

Prior art: Scissorhands (Liu et al. 2023, arXiv:2305.17118) keeps tokens that
were important in a history window; AttentionPredictor (Yang et al. 2025,
arXiv:2502.04077) learns to predict next-step attention from its history.
The simple twin is :class:`~vllm_kvshrink.methods.ema.EMAAttention`.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import torch
from torch import nn

from vllm_kvshrink.methods.base import ScoringMethod, extend_state
from vllm_kvshrink.methods.ema import ema_update
from vllm_kvshrink.methods.h2o import new_query_mask
from vllm_kvshrink.methods.params import ONLINE_LEARNING, Param

#: Weights warmed up offline on the essays with SmolLM2-135M (see hf/warmup.py).
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "temporal.pt"
HISTORY = 16
NUM_STATIC = 4


class TemporalNet(nn.Module):
    """``(hist [B, T], static [B, 3]) -> [B]`` predicted ``log1p(N * a)``.

    One transformer block whose query is the token's summary embedding and
    whose keys and values are the summary plus the ``T`` history steps, each
    embedded as ``a_t * w + b + time_t`` (learned temporal position
    embeddings), followed by a feed-forward layer and a linear read-out.  Only
    the summary position is computed (the history steps do not attend to each
    other), so the history embedding, being affine in ``a_t``, folds into the
    key and value projections and the block costs ``O(T * d)`` per token
    instead of ``O(T * d^2)`` -- it has to run over every cached token of every
    layer and head at each event.
    """

    def __init__(self, history: int = HISTORY, d_model: int = 16, heads: int = 2,
                 ff: int = 32) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} not a multiple of heads={heads}")
        self.history, self.d, self.heads = history, d_model, heads
        self.w_in = nn.Parameter(torch.randn(d_model) * 0.5)
        self.b_in = nn.Parameter(torch.zeros(d_model))
        self.time = nn.Parameter(torch.randn(history, d_model) * 0.1)
        self.summary = nn.Linear(NUM_STATIC, d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.ff = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, ff), nn.GELU(),
                                nn.Linear(ff, d_model))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, 1)

    def forward(self, hist: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        b, t = hist.shape
        h, dh = self.heads, self.d // self.heads
        s = self.summary(static)  # [B, d]
        q = self.q(s).view(b, h, dh) * dh**-0.5
        # Key / value of history step t: (a_t * w + b + time_t) @ W + bias
        #   = a_t * (W w) + (W (b + time_t) + bias).
        uk = (self.k.weight @ self.w_in).view(h, dh)
        ck = self.k(self.b_in + self.time).view(t, h, dh)
        uv = (self.v.weight @ self.w_in).view(h, dh)
        cv = self.v(self.b_in + self.time).view(t, h, dh)
        scores = hist[:, None, :] * torch.einsum("bhd,hd->bh", q, uk)[..., None] \
            + torch.einsum("bhd,thd->bht", q, ck)  # [B, h, T]
        self_score = (q * self.k(s).view(b, h, dh)).sum(-1, keepdim=True)
        p = torch.softmax(torch.cat([self_score, scores], dim=-1), dim=-1)
        ph = p[..., 1:]
        mixed = (p[..., :1] * self.v(s).view(b, h, dh)
                 + (ph * hist[:, None, :]).sum(-1, keepdim=True) * uv
                 + torch.einsum("bht,thd->bhd", ph, cv))
        x = s + self.o(mixed.reshape(b, self.d))
        x = x + self.ff(x)
        return self.out(self.norm(x))[:, 0]

    def reference_forward(self, hist: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """The same block computed the plain way (embed every step, project,
        attend), for tests."""
        b, t = hist.shape
        h, dh = self.heads, self.d // self.heads
        s = self.summary(static)
        steps = hist[..., None] * self.w_in + self.b_in + self.time  # [B, T, d]
        tokens = torch.cat([s[:, None], steps], dim=1)  # [B, T+1, d]
        q = self.q(s).view(b, h, 1, dh)
        k = self.k(tokens).view(b, t + 1, h, dh).transpose(1, 2)
        v = self.v(tokens).view(b, t + 1, h, dh).transpose(1, 2)
        att = torch.softmax((q @ k.transpose(-1, -2)) * dh**-0.5, dim=-1) @ v
        x = s + self.o(att.reshape(b, self.d))
        x = x + self.ff(x)
        return self.out(self.norm(x))[:, 0]


def features(attn: torch.Tensor, ema_prev: torch.Tensor, n_prev: int,
             history: int = HISTORY, ema_now: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the predictor for every cached token.

    Args:
        attn: ``[L, H, W, N]`` window attention (GQA-group mean), oldest first.
        ema_prev: ``[L, H, N]`` long-run moving average (0 for new tokens).
        n_prev: tokens that were in the cache at the previous event.
        ema_now: the moving average with this window folded in (what the
            ``ema`` twin scores), so the network learns a correction to it.

    Returns:
        ``hist [L, H, N, T]`` = ``log1p(N * a)`` of the last ``T`` queries
        (zero-padded in front when fewer), ``static [L, H, N, 4]``.
    """
    l, h, w, n = attn.shape
    a = attn[:, :, -history:] if w >= history else torch.cat(
        [attn.new_zeros(l, h, history - w, n), attn], dim=2)
    hist = torch.log1p(a * n).permute(0, 1, 3, 2)
    j = torch.arange(n, dtype=torch.float32)
    age = ((n - 1 - j) / max(n - 1, 1)).expand(l, h, n)
    seen = (j < n_prev).to(torch.float32).expand(l, h, n)
    now = ema_prev if ema_now is None else ema_now
    static = torch.stack([torch.log1p(ema_prev * n), age, seen, torch.log1p(now * n)],
                         dim=-1)
    return hist.contiguous(), static


def target_of(future_attn: torch.Tensor, n: int) -> torch.Tensor:
    return torch.log1p(future_attn * n)


def ranking_accuracy(pred: torch.Tensor, true: torch.Tensor, frac: float = 0.1
                     ) -> tuple[float, float]:
    """Mean over rows of recall@k (``k = ceil(frac * n)``: share of the true
    top-k found in the predicted top-k) and of Spearman's rank correlation.

    Args: ``pred``, ``true``: ``[R, n]``.
    """
    r, n = true.shape
    if n < 2 or r == 0:
        return float("nan"), float("nan")
    k = max(1, math.ceil(frac * n))
    top_p = torch.topk(pred, k, dim=-1).indices
    top_t = torch.topk(true, k, dim=-1).indices
    hit = torch.zeros(r, n, dtype=torch.bool)
    hit.scatter_(1, top_t, True)
    recall = hit.gather(1, top_p).float().sum(1) / k

    def ranks(x):
        return x.argsort(dim=-1).argsort(dim=-1).to(torch.float32)

    rp, rt = ranks(pred), ranks(true)
    rp -= rp.mean(1, keepdim=True)
    rt -= rt.mean(1, keepdim=True)
    rho = (rp * rt).sum(1) / (rp.norm(dim=1) * rt.norm(dim=1)).clamp_min(1e-12)
    return float(recall.mean()), float(rho.mean())


class SharedPredictor:
    """One network + optimiser shared by every request of the process."""

    def __init__(self, path: str | os.PathLike | None = None, lr: float = 1e-3,
                 seed: int = 0) -> None:
        # The engine's worker runs under inference mode: parameters made there
        # could never be trained.
        with torch.inference_mode(False), torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = TemporalNet()
        self.meta: dict = {"source": "random init", "seed": seed}
        if path:
            with torch.inference_mode(False):
                self.load(path)
        self.net.eval()
        self.lr = lr
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=0.01)
        self.gen = torch.Generator().manual_seed(seed)
        self.lock = threading.Lock()
        self.stats = {"updates": 0, "loss": float("nan"), "scored_events": 0,
                      "recall_sum": 0.0, "spearman_sum": 0.0}

    # -------------------------------------------------------------- weights
    def save(self, path: str | os.PathLike, **meta) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"state_dict": self.net.state_dict(), "history": self.net.history,
                    "meta": {**self.meta, **meta}}, tmp)
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike) -> None:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            self.net.load_state_dict(blob["state_dict"])
        except FileNotFoundError:
            raise FileNotFoundError(
                f"predictor_path={str(path)!r} does not exist; allowed: a file "
                f"written by SharedPredictor.save or vllm_kvshrink.lab.hf.warmup"
            ) from None
        except (KeyError, RuntimeError) as e:
            raise ValueError(f"predictor_path={str(path)!r} is not a temporal "
                             f"predictor checkpoint ({e})") from None
        self.meta = dict(blob.get("meta", {}), loaded_from=str(path))

    # ------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, hist: torch.Tensor, static: torch.Tensor,
                chunk: int = 65536) -> torch.Tensor:
        with self.lock:
            outs = [self.net(hist[i:i + chunk], static[i:i + chunk])
                    for i in range(0, hist.shape[0], chunk)]
        return torch.cat(outs) if outs else hist.new_zeros(0)

    def train_step(self, hist: torch.Tensor, static: torch.Tensor,
                   target: torch.Tensor) -> float:
        with self.lock, torch.inference_mode(False), torch.enable_grad():
            # Inputs made under inference mode cannot be saved for backward.
            hist, static, target = hist.clone(), static.clone(), target.clone()
            self.net.train()
            pred = self.net(hist, static)
            loss = nn.functional.mse_loss(pred, target)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.opt.step()
            self.net.eval()
            self.stats["updates"] += 1
            self.stats["loss"] = float(loss.detach())
        return float(loss.detach())

    def record_accuracy(self, pred: torch.Tensor, true: torch.Tensor) -> None:
        recall, rho = ranking_accuracy(pred.reshape(-1, pred.shape[-1]),
                                       true.reshape(-1, true.shape[-1]))
        if math.isnan(recall):
            return
        self.stats["scored_events"] += 1
        self.stats["recall_sum"] += recall
        self.stats["spearman_sum"] += rho

    def summary(self) -> dict:
        s = dict(self.stats)
        k = max(1, s["scored_events"])
        s["recall_at_10pct"] = s.pop("recall_sum") / k if s["scored_events"] else None
        s["spearman"] = s.pop("spearman_sum") / k if s["scored_events"] else None
        return s


_SHARED: dict[tuple, SharedPredictor] = {}


def shared_predictor(path: str = "", lr: float = 1e-3) -> SharedPredictor:
    """The process-wide predictor for ``path`` ('' = the shipped weights)."""
    if not path:
        path = str(DEFAULT_WEIGHTS) if DEFAULT_WEIGHTS.exists() else ""
    key = (path, lr)
    if key not in _SHARED:
        _SHARED[key] = SharedPredictor(path or None, lr=lr)
    return _SHARED[key]


class TemporalImportance(ScoringMethod):
    name = "temporal"
    needs_queries = True
    stateful = True
    paper = ("own method; prior art: Scissorhands arXiv:2305.17118, "
             "AttentionPredictor arXiv:2502.04077")

    def __init__(self, predictor: SharedPredictor | None = None, online: bool = True,
                 train_rows: int = 1024, decay: float = 0.9,
                 save_path: str = "", save_every: int = 50) -> None:
        if train_rows < 1:
            raise ValueError(f"train_rows={train_rows!r}; allowed: a whole number >= 1")
        self.predictor = predictor or shared_predictor()
        self.online = online
        self.train_rows = train_rows
        self.decay = decay
        self.save_path = save_path
        self.save_every = save_every

    def score_layers(self, obs, state):
        l, h, n = obs.keys.shape[:3]
        attn = obs.attention()  # [L, H, W, N]
        new = new_query_mask(obs, state)
        n_prev = state.get("n", 0)
        p = self.predictor
        if "pred" in state and bool(new.any()) and n_prev > 1:
            # Labels for the previous event's predictions have arrived.
            true = target_of(attn[:, :, new].mean(dim=2)[:, :, :n_prev], n)
            p.record_accuracy(state["pred"], true)
            if self.online and "train_rows" in state:
                rows = state["train_rows"]
                p.train_step(state["train_hist"], state["train_static"],
                             true.reshape(-1)[rows])
                if self.save_path and p.stats["updates"] % self.save_every == 0:
                    p.save(self.save_path)
        ema_prev = extend_state(state.get("ema"), n, lh=(l, h))
        ema_now = ema_update(ema_prev, attn[:, :, new], self.decay)
        hist, static = features(attn, ema_prev, n_prev, ema_now=ema_now)
        pred = p.predict(hist.view(-1, hist.shape[-1]),
                         static.view(-1, static.shape[-1])).view(l, h, n)
        state["_ema"] = ema_now
        state["_hist"], state["_static"], state["_pred"] = hist, static, pred
        return pred

    def update(self, state, keep):
        l, h, k = keep.shape
        hist, static = state.pop("_hist"), state.pop("_static")
        state["pred"] = state.pop("_pred").gather(2, keep)
        state["ema"] = state.pop("_ema").gather(2, keep)
        state["n"] = k
        if self.online and k > 1:
            rows = torch.randperm(l * h * k, generator=self.predictor.gen)[: self.train_rows]
            t = hist.shape[-1]
            kh = hist.gather(2, keep[..., None].expand(l, h, k, t)).reshape(-1, t)
            f = static.shape[-1]
            ks = static.gather(2, keep[..., None].expand(l, h, k, f)).reshape(-1, f)
            state["train_rows"] = rows
            state["train_hist"] = kh[rows]
            state["train_static"] = ks[rows]


#: temporal's parameters (gathered by the registry, :mod:`vllm_kvshrink.methods`);
#: ``online`` and ``lr`` are shared with semantic.
PARAMS = {
    "predictor_path": Param(str, "", "temporal: checkpoint to load ('' = the shipped "
                            "weights warmed up on the essays)"),
    "predictor_save": Param(str, "", "temporal: save the online-trained weights here "
                            "every 50 updates ('' = never)"),
    **ONLINE_LEARNING,
    "train_rows": Param(int, 1024, "temporal: training rows sampled per event",
                        lambda v: v >= 1, "a whole number >= 1"),
}


def build(cfg) -> TemporalImportance:
    """The method from resolved arguments ``cfg.args``; requests sharing a
    checkpoint and learning rate share one predictor."""
    a = cfg.args
    return TemporalImportance(shared_predictor(a["predictor_path"], a["lr"]),
                              online=a["online"], train_rows=a["train_rows"],
                              save_path=a["predictor_save"])
