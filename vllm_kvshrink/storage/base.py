"""The interface every storage form implements.

A *form* is how one cached token of one (layer, KV head) is held: its K and V
vectors in bf16, or as integer codes with their scales and zero points, or
in one of vLLM's own quantized KV formats (the baselines).  Like a method, a
form sees tensors only.  It states exactly what it costs:

* :meth:`StorageForm.nbytes` -- bytes of ``n`` tokens of one (layer, KV head),
  K and V together: codes + scales + zero points at their stored precision
  (a form whose parameters are shared by a group of tokens pays for every
  started group);
* :meth:`StorageForm.tokens_per_page` -- how many such tokens fit the bytes
  one of vLLM's pages gives a KV head (``block_size`` tokens in the model
  dtype), which is what the engine's packed blocks will hold;
* :meth:`StorageForm.roundtrip` -- the K/V attention reads back after the
  form has stored them (quantize, then dequantize), the same tensors the
  research path attends over and the engine's kernel reconstructs.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vllm_kvshrink.policy.nbytes import token_bytes


class StorageForm:
    """One way to hold cached K/V.  Subclasses set the class attributes and
    implement :meth:`nbytes` and :meth:`roundtrip`."""

    name: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    #: bits per stored K/V element of the codes (16 for bf16, 0 for evicted)
    bits: ClassVar[int] = 16
    #: where the scheme comes from, for the README and reports
    paper: ClassVar[str] = ""
    #: ``"ours"`` (a form the tier policy may choose) or ``"vllm"`` (one of
    #: vLLM 0.32's uniform formats, an evaluation baseline)
    kind: ClassVar[str] = "ours"
    #: whether a token's stored bytes depend on that token alone (no
    #: parameter shared with its neighbours): a token that stays in such a
    #: form keeps its bytes from event to event, and only tokens entering it
    #: are stored anew (:func:`~vllm_kvshrink.storage.policy.apply_tiers`)
    token_local: ClassVar[bool] = False

    def nbytes(self, n_tokens: int, head_dim: int) -> int:
        """Exact bytes of ``n_tokens`` tokens of one (layer, KV head), K + V."""
        raise NotImplementedError

    def bytes_per_token(self, head_dim: int, n_tokens: int = 1024) -> float:
        """Bytes per token of one (layer, KV head), K + V, at ``n_tokens``
        (parameters shared by a group amortised over full groups)."""
        return self.nbytes(n_tokens, head_dim) / n_tokens

    def tokens_per_page(self, head_dim: int, block_size: int, elem_bytes: int = 2) -> int:
        """Most tokens whose :meth:`nbytes` fit one vLLM page of one KV head
        (``block_size`` tokens x K and V x ``head_dim`` x ``elem_bytes``)."""
        page = block_size * token_bytes(1, head_dim, elem_bytes)
        per = self.bytes_per_token(head_dim)
        if per <= 0:
            raise ValueError(f"form {self.name!r} holds no bytes")
        n = int(page // per) + 1
        while n > 0 and self.nbytes(n, head_dim) > page:
            n -= 1
        return n

    def roundtrip(self, keys: torch.Tensor, values: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store then read back.

        Args:
            keys, values: ``[A, N, D]`` float (``A`` = flattened (layer, KV
                head) rows, ``N`` tokens in cache order).

        Returns:
            ``(keys, values)`` ``[A, N, D]`` in the input dtype: what attention
            reads from this form.
        """
        raise NotImplementedError

    def describe(self, head_dim: int | None = None, block_size: int | None = None) -> str:
        if head_dim is None:
            return self.doc
        per = self.bytes_per_token(head_dim)
        s = f"{per:.2f} B/token/head ({per / (4 * head_dim):.3f} of bf16)"
        if block_size:
            s += f", {self.tokens_per_page(head_dim, block_size)} tokens per {block_size}-token page"
        return f"{s}; {self.doc}"
