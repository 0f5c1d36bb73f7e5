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


def _spec(cls=FullAttentionSpec, num_kv_heads=3, **kw):
    return cls(block_size=32, num_kv_heads=num_kv_heads, head_size=64, dtype=torch.bfloat16,
               **kw)


def _kv(*specs):
    return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=s) for s in specs])


def _vllm(**parallel):
    pc = dict(tensor_parallel_size=1, pipeline_parallel_size=1,
              decode_context_parallel_size=1, prefill_context_parallel_size=1)
    pc.update(parallel)
    return SimpleNamespace(model_config=SimpleNamespace(model="org/some-model",
                                                        get_total_num_kv_heads=lambda: 3),
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


def test_tensor_parallelism_that_splits_the_kv_heads_is_accepted():
    check_supported(_vllm(tensor_parallel_size=3), _kv(_spec(num_kv_heads=1)))


def test_tensor_parallelism_that_replicates_kv_heads_is_refused():
    msg = _refused(_vllm(tensor_parallel_size=2), _kv(_spec()))
    assert "tensor_parallel_size=2" in msg and "3 KV heads" in msg
    assert "a tensor_parallel_size that divides 3" in msg


@pytest.mark.parametrize("setting", ["pipeline_parallel_size",
                                     "decode_context_parallel_size",
                                     "prefill_context_parallel_size"])
def test_pipeline_and_context_parallelism_are_refused(setting):
    msg = _refused(_vllm(**{setting: 2}), _kv(_spec()))
    assert "pipeline_parallel_size" in msg and "context" in msg


# --------------------------------------------------------------------------
# Storage refusals, by calling the checks the engine calls: ``register()``
# (``KVShrinkConfig.from_env`` and ``check_storage_method``), the scheduler
# (``check_cache_dtype``) and the front end per request (``request_config``).
# That a refusal stops vLLM's start-up with its message is shown once, by an
# engine (tests/engine/test_engine_behaviour.py::test_bad_setting_stops_engine_start).
# --------------------------------------------------------------------------
def _env_config(monkeypatch, **env):
    from vllm_kvshrink.config import KVShrinkConfig

    for key, value in env.items():
        monkeypatch.setenv("VLLM_KVSHRINK_" + key, value)
    return KVShrinkConfig.from_env()


def test_a_form_pages_cannot_hold_is_refused(monkeypatch):
    cfg = _env_config(monkeypatch, METHOD="snapkv", BUDGET="0.25", STORAGE="bf16,int4")
    with pytest.raises(KVShrinkConfigError) as err:
        cfg.check_servable()
    msg = str(err.value)
    assert "VLLM_KVSHRINK_STORAGE='bf16,int4'" in msg and "int4_tok" in msg


def test_tiered_storage_without_a_method_is_refused_at_start_up(monkeypatch):
    import vllm_kvshrink

    monkeypatch.setenv("VLLM_KVSHRINK_STORAGE", "bf16,int4_tok")
    monkeypatch.delenv("VLLM_KVSHRINK_METHOD", raising=False)
    monkeypatch.setattr(vllm_kvshrink, "_REGISTERED", False)
    with pytest.raises(KVShrinkConfigError, match="VLLM_KVSHRINK_METHOD is 'none'"):
        vllm_kvshrink.register()
    assert not vllm_kvshrink.is_active()


def test_tiered_storage_with_a_quantized_vllm_cache_is_refused(monkeypatch):
    from vllm_kvshrink.policy.checks import check_cache_dtype, request_config

    tiered = _env_config(monkeypatch, METHOD="snapkv", BUDGET="0.25",
                         STORAGE="bf16,int4_tok")
    with pytest.raises(KVShrinkConfigError, match="kv_cache_dtype='fp8'"):
        check_cache_dtype(tiered, "fp8")
    check_cache_dtype(tiered, "auto")
    # per request, as the front end checks each one: the request's own setting
    # is named, and eviction alone stays allowed on an fp8 cache
    plain = _env_config(monkeypatch, STORAGE="bf16", BUDGET="64")
    extra = {"kvshrink": {"storage": "bf16,int4_tok", "budget": 0.25}}
    with pytest.raises(KVShrinkConfigError) as err:
        request_config(plain, extra, "fp8")
    msg = str(err.value)
    assert "kv_cache_dtype='fp8'" in msg and "extra_args['kvshrink']['storage']" in msg
    assert request_config(plain, {"kvshrink": {"budget": 0.25}}, "fp8").budget == 0.25
