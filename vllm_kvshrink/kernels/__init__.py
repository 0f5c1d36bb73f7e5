"""Kernels the engine runs, by what they serve.  Importing the package
imports nothing; each module is imported by name.

Quantization and the page format:

* :mod:`.quant` -- the quantizer (``kvshrink::quantize`` /
  ``kvshrink::dequantize`` custom ops, :class:`~.quant.Quantized`) and the
  packed page format (:class:`~.quant.PagedForm`, ``pack``, ``unpack``);
  needs no Triton until a launch goes to it;
* :mod:`.reference` -- the quantizer's PyTorch twins (define the rounding);
* :mod:`.triton_quant` -- the quantizer's Triton launches (grids);
* :mod:`.hadamard` -- the rotation of ``*_rot`` forms.

Packed attention (one softmax over plain and packed tokens):

* :mod:`.packed_attention` -- the entry point, choosing a backend;
* :mod:`.packed_batch` -- :class:`~.packed_batch.PackedBatch`, the shared
  check and the rotation of queries and outputs;
* :mod:`.packed_reference` -- the PyTorch reference;
* :mod:`.cpu_ext` -- the C++ kernel (``csrc/cpu``);
* :mod:`.triton_packed` -- the Triton kernel's host side.

Shared: :mod:`.triton_kernels` (every ``@triton.jit`` kernel above, nothing
else), :mod:`._launch` (compiled or interpreted launches), :mod:`._checks`
(argument checks), :mod:`.layouts` (vLLM's cache layouts as K/V views) and
:mod:`.aot` (ahead-of-time compilation of the Triton kernels for a GPU).

Kernels nothing in the engine calls (compaction, merging, window scoring,
the CUDA extension) are in :mod:`vllm_kvshrink.lab.kernels`.
"""
