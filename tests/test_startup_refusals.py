"""What the engine path refuses at start-up (``core.scheduler.check_supported``),
each with a message that names the setting and the way out.

The configurations are vLLM's own KV-cache specs inside plain namespaces for
the rest of the engine config: ``check_supported`` reads only these fields.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

from vllm_kvshrink.serving.core.scheduler import check_supported
from vllm_kvshrink.envs import KVShrinkConfigError


def _spec(cls=FullAttentionSpec, **kw):
    return cls(block_size=32, num_kv_heads=3, head_size=64, dtype=torch.bfloat16, **kw)


def _kv(*specs):
    return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=s) for s in specs])


def _vllm(**parallel):
    pc = dict(tensor_parallel_size=1, pipeline_parallel_size=1,
              decode_context_parallel_size=1, prefill_context_parallel_size=1)
    pc.update(parallel)
    return SimpleNamespace(model_config=SimpleNamespace(model="org/some-model"),
                           speculative_config=None, kv_transfer_config=None,
                           parallel_config=SimpleNamespace(**pc))


def test_a_plain_full_attention_model_is_accepted():
    check_supported(_vllm(), _kv(_spec()))


def _refused(vllm_config, kv_config) -> str:
    with pytest.raises(KVShrinkConfigError) as ei:
        check_supported(vllm_config, kv_config)
    msg = str(ei.value)
    assert "VLLM_KVSHRINK_METHOD" in msg  # names the way out
    return msg


def test_hybrid_sliding_window_model_is_refused():
    msg = _refused(_vllm(), _kv(_spec(), _spec(SlidingWindowSpec, sliding_window=512)))
    assert "org/some-model" in msg and "2 KV-cache groups" in msg
    assert "VLLM_KVSHRINK_METHOD=none" in msg


def test_sliding_window_only_model_is_refused():
    msg = _refused(_vllm(), _kv(_spec(SlidingWindowSpec, sliding_window=512)))
    assert "SlidingWindowSpec" in msg and "FullAttentionSpec" in msg


def test_full_attention_with_a_window_is_refused():
    msg = _refused(_vllm(), _kv(_spec(sliding_window=256)))
    assert "full attention" in msg


def test_speculative_decoding_is_refused():
    cfg = _vllm()
    cfg.speculative_config = object()
    assert "speculative decoding" in _refused(cfg, _kv(_spec()))


def test_kv_connector_is_refused():
    cfg = _vllm()
    cfg.kv_transfer_config = object()
    assert "kv_transfer_config" in _refused(cfg, _kv(_spec()))


def test_tensor_parallelism_is_refused():
    msg = _refused(_vllm(tensor_parallel_size=2), _kv(_spec()))
    assert "tensor_parallel_size=2" in msg and "allowed: tensor_parallel_size=1" in msg


@pytest.mark.parametrize("setting", ["pipeline_parallel_size",
                                     "decode_context_parallel_size",
                                     "prefill_context_parallel_size"])
def test_pipeline_and_context_parallelism_are_refused(setting):
    msg = _refused(_vllm(**{setting: 2}), _kv(_spec()))
    assert "pipeline_parallel_size" in msg and "context" in msg
