"""Shapes shared by the kernel benchmark (``run_all.py``) and the
ahead-of-time compile check (``aot_check.py``).

``LLAMA3_8B``: Llama-3-8B's KV cache (32 layers, 8 KV heads / 32 query heads,
head dim 128, vLLM block size 16) for one 4096-token request keeping 25%;
quantization groups of 32, a 32-query observation window.  ``SMOKE``: tiny
shapes for Triton's CPU interpreter.
"""

LLAMA3_8B = dict(layers=32, kv_heads=8, q_heads=32, head_dim=128, block=16, tokens=4096,
                 keep=0.25, window=32, group=32, merge_tokens=4096)
SMOKE = dict(layers=2, kv_heads=2, q_heads=4, head_dim=16, block=16, tokens=64, keep=0.25,
             window=8, group=16, merge_tokens=64)
