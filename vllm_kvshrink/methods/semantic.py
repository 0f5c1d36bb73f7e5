"""Semantic merger: fold the tokens an importance method would evict into the
most similar kept token instead of dropping them.

Keys are projected into a learned embedding (``[D, E]``, shared by every
layer and head of the process) trained with a contrastive objective: two
tokens are positives when they attract similar attention from the observation
window (InfoNCE over sampled tokens, AdamW, gradient clipping).  At each
event, every evicted token finds its nearest kept token by cosine similarity
in that space (same layer and KV head); if the similarity reaches
``merge_threshold`` it joins that token's group, otherwise it is dropped.
Each group's key and value become the average of its members weighted by the
attention they received from the window, and the number of tokens a kept slot
stands for is remembered (``count``).  The research path can add
``log(count)`` to the attention logits (``mass_correction``); vLLM's CPU
attention kernel takes no per-token bias, so the engine refuses that option.

Prior art: CaM (Zhang et al. 2024, ICML), D2O (arXiv:2406.13035), KVMerger
(arXiv:2407.08454) and ClusterKV (arXiv:2412.03213) merge or cluster similar
KV states; token merging with size-weighted attention comes from ToMe
(Bolya et al. 2023, arXiv:2210.09461).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_kvshrink.methods.base import ScoringMethod, extend_state
from vllm_kvshrink.methods.params import ONLINE_LEARNING, Param

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "semantic.pt"


class SharedEmbedding:
    """The key projection ``[D, E]`` and its optimiser, shared per process."""

    def __init__(self, head_dim: int, dim: int = 32, path: str | None = None,
                 lr: float = 1e-3, seed: int = 0, tau: float = 0.1) -> None:
        g = torch.Generator().manual_seed(seed)
        # The engine's worker runs under inference mode: a parameter made
        # there could never be trained.
        with torch.inference_mode(False):
            q, _ = torch.linalg.qr(torch.randn(head_dim, max(head_dim, dim), generator=g))
            self.proj = q[:, :dim].clone().requires_grad_(True)
            self.meta: dict = {"source": "random orthogonal init", "seed": seed}
            if path:
                self.load(path)
        self.tau = tau
        self.opt = torch.optim.AdamW([self.proj], lr=lr, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(seed)
        self.lock = threading.Lock()
        self.stats = {"updates": 0, "loss": float("nan")}

    def embed(self, keys: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            flat = keys.reshape(-1, keys.shape[-1]).to(torch.float32) @ self.proj
            return F.normalize(flat, dim=-1).view(*keys.shape[:-1], -1)

    def save(self, path, **meta) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"proj": self.proj.detach().clone(), "meta": {**self.meta, **meta}}, tmp)
        os.replace(tmp, path)

    def load(self, path) -> None:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            proj = blob["proj"]
        except FileNotFoundError:
            raise FileNotFoundError(
                f"embed_path={str(path)!r} does not exist; allowed: a file written "
                f"by SharedEmbedding.save or vllm_kvshrink.lab.hf.warmup") from None
        except (KeyError, RuntimeError) as e:
            raise ValueError(f"embed_path={str(path)!r} is not a key embedding ({e})"
                             ) from None
        if proj.shape[0] != self.proj.shape[0]:
            raise ValueError(f"embed_path={str(path)!r} projects head_dim "
                             f"{proj.shape[0]}, the model has {self.proj.shape[0]}")
        self.proj = proj.clone().requires_grad_(True)
        self.meta = dict(blob.get("meta", {}), loaded_from=str(path))

    def contrastive_step(self, keys: torch.Tensor, profiles: torch.Tensor,
                         samples: int = 128, pairs: int = 8) -> float | None:
        """One InfoNCE step.  ``keys`` ``[L, H, N, D]``, ``profiles``
        ``[L, H, N, W]`` attention each token received from each window query.
        For each sampled anchor the positive is the other sampled token with the
        most similar attention profile."""
        with torch.inference_mode(False), torch.enable_grad():
            return self._contrastive_step(keys.clone(), profiles.clone(), samples, pairs)

    def _contrastive_step(self, keys, profiles, samples, pairs):
        l, h, n, _ = keys.shape
        if n < 4:
            return None
        m = min(samples, n)
        heads = torch.randint(0, l * h, (pairs,), generator=self.gen)
        tok = torch.stack([torch.randperm(n, generator=self.gen)[:m] for _ in range(pairs)])
        k = keys.reshape(l * h, n, -1)[heads[:, None], tok].to(torch.float32)  # [P, m, D]
        prof = F.normalize(torch.log1p(
            profiles.reshape(l * h, n, -1)[heads[:, None], tok] * n), dim=-1)
        sim = prof @ prof.transpose(1, 2)
        sim.diagonal(dim1=1, dim2=2).fill_(-2.0)
        positive = sim.argmax(dim=-1)  # [P, m]
        with self.lock:
            z = F.normalize(k @ self.proj, dim=-1)
            logits = z @ z.transpose(1, 2) / self.tau
            eye = torch.eye(m, dtype=torch.bool)
            logits = logits.masked_fill(eye, float("-inf"))
            loss = F.cross_entropy(logits.reshape(-1, m), positive.reshape(-1))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([self.proj], 1.0)
            self.opt.step()
            self.stats["updates"] += 1
            self.stats["loss"] = float(loss.detach())
        return float(loss.detach())


_SHARED: dict[tuple, SharedEmbedding] = {}


def shared_embedding(head_dim: int, path: str = "", lr: float = 1e-3) -> SharedEmbedding:
    """The process-wide embedding for ``path`` ('' = the shipped weights when
    they fit ``head_dim``, else a seeded random orthogonal projection)."""
    key = (head_dim, path, lr)
    if key not in _SHARED:
        load = path
        if not path and DEFAULT_WEIGHTS.exists():
            blob = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
            if blob["proj"].shape[0] == head_dim:
                load = str(DEFAULT_WEIGHTS)
        _SHARED[key] = SharedEmbedding(head_dim, path=load or None, lr=lr)
    return _SHARED[key]


def group_and_merge(keys, values, weights, keep, z, threshold, counts):
    """Assign every evicted token to its most similar kept token and average.

    Args:
        keys, values: ``[L, H, N, D]``; weights: ``[L, H, N]`` (> 0);
        keep: ``[L, H, K]``; z: ``[L, H, N, E]`` unit embeddings;
        counts: ``[L, H, N]`` tokens each slot already stands for.

    Returns:
        merged keys, values ``[L, H, K, D]`` (float32), new counts ``[L, H, K]``,
        number of evicted tokens merged.
    """
    l, h, n, d = keys.shape
    k = keep.shape[2]
    e = z.shape[-1]
    dev = keys.device
    evicted = torch.ones(l, h, n, dtype=torch.bool, device=dev)
    evicted.scatter_(2, keep, False)
    # Every (layer, head) evicts the same number of tokens: a dense
    # [L, H, N-K] index of them, ascending (nonzero is row-major).
    ev_idx = evicted.nonzero()[:, 2].view(l, h, n - k)
    z_ev = z.gather(2, ev_idx[..., None].expand(l, h, n - k, e))
    zk = z.gather(2, keep[..., None].expand(l, h, k, e))
    best_sim, best = (z_ev @ zk.transpose(-1, -2)).max(dim=-1)  # [L, H, N-K]
    joins = best_sim >= threshold
    # Group of each token: its own slot if kept, its nearest kept slot if it
    # joins, the trash slot K otherwise.
    group = torch.empty(l, h, n, dtype=torch.int64, device=dev)
    group.scatter_(2, keep, torch.arange(k, device=dev).expand(l, h, k))
    group.scatter_(2, ev_idx, torch.where(joins, best, k))
    flat = (group + torch.arange(l * h, device=dev).view(l, h, 1) * (k + 1)).view(-1)
    w = (weights.to(torch.float32) * counts).view(-1)
    rows = l * h * (k + 1)

    def pooled(x):
        out = torch.zeros(rows, d, device=dev)
        out.index_add_(0, flat, x.reshape(-1, d).to(torch.float32) * w[:, None])
        return out.view(l, h, k + 1, d)[:, :, :k]

    ws = torch.zeros(rows, device=dev).index_add_(0, flat, w).view(l, h, k + 1)[..., :k]
    cs = torch.zeros(rows, device=dev).index_add_(
        0, flat, counts.reshape(-1).to(torch.float32)).view(l, h, k + 1)[..., :k]
    denom = ws[..., None]
    return pooled(keys) / denom, pooled(values) / denom, cs, int(joins.sum())


class SemanticMerge(ScoringMethod):
    """``<importance>+semantic``: the inner method chooses who stays, the
    merger folds the rest into them."""

    needs_queries = True
    stateful = True
    merges = True
    paper = ("own method; prior art: CaM, D2O arXiv:2406.13035, KVMerger "
             "arXiv:2407.08454, ClusterKV arXiv:2412.03213")

    def __init__(self, inner: ScoringMethod, threshold: float = 0.5, online: bool = True,
                 embed_path: str = "", lr: float = 1e-3,
                 mass_correction: bool = False) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"merge_threshold={threshold!r}; allowed: -1 <= x <= 1")
        self.inner = inner
        self.name = f"{inner.name}+semantic"
        self.threshold = threshold
        self.online = online
        self.embed_path = embed_path
        self.lr = lr
        self.mass_correction = mass_correction

    def embedding(self, head_dim: int) -> SharedEmbedding:
        return shared_embedding(head_dim, self.embed_path, self.lr)

    def score_layers(self, obs, state):
        return self.inner.score_layers(obs, state.setdefault("inner", {}))

    def merge(self, obs, values, scores, keep, state):
        l, h, n, d = obs.keys.shape
        emb = self.embedding(d)
        attn = obs.attention()  # [L, H, W, N]
        if self.online:
            emb.contrastive_step(obs.keys, attn.permute(0, 1, 3, 2))
        weights = attn.sum(dim=2) + 1e-6
        counts = extend_state(state.get("count"), n, fill=1.0, lh=(l, h))
        mk, mv, cnt, merged = group_and_merge(obs.keys, values, weights, keep,
                                              emb.embed(obs.keys), self.threshold, counts)
        state["_count"] = cnt
        return mk, mv, merged

    def update(self, state, keep):
        self.inner.update(state.setdefault("inner", {}), keep)
        state["count"] = state.pop("_count")

    def log_mass(self, state) -> torch.Tensor | None:
        """``[L, H, K]`` attention-logit bias for merged slots (research path)."""
        c = state.get("count")
        return None if c is None else torch.log(c)


#: semantic's parameters (gathered by the registry, :mod:`vllm_kvshrink.methods`);
#: they apply to every ``<method>+semantic``.  ``online`` and ``lr`` are shared
#: with temporal.
PARAMS = {
    "merge_threshold": Param(float, 0.5, "semantic: least cosine similarity (learned "
                             "key embedding) at which an evicted token merges",
                             lambda v: -1 <= v <= 1, "-1 <= x <= 1"),
    "embed_path": Param(str, "", "semantic: key-embedding checkpoint ('' = shipped "
                        "or random orthogonal)"),
    **ONLINE_LEARNING,
    "mass_correction": Param(bool, False, "semantic: add log(count) to merged slots' "
                             "attention logits (research path only)",
                             research_only=True),
}
