"""Streaming-input sessions (``AsyncLLM.generate`` fed by an input stream;
vLLM re-adds the live request to extend it): refused with a clear error when
compression is on for the session, and served as stock when it opts out
(fp32: in bf16 vLLM's kernel splits work by the whole batch's sequence lengths,
so a neighbour's compressed cache can change the rounding)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_kvshrink.lab.bench.launch import plugin_free_env

pytestmark = pytest.mark.engine

SCRIPT = r'''
import asyncio, json, sys
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.engine.protocol import StreamingInput
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.inputs import TokensPrompt

model = sys.argv[1]

async def session(llm, rid, extra):
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, extra_args=extra)
    async def chunks():
        for i in range(2):
            yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=list(range(100 + 50 * i, 140 + 50 * i))))
            await asyncio.sleep(0.5)
    out = []
    try:
        async for o in llm.generate(chunks(), sp, rid):
            out.append(list(o.outputs[0].token_ids))
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"outputs": out}

async def main():
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, dtype="float32", max_model_len=512,
        kv_cache_memory_bytes=32 << 20, block_size=32, max_num_seqs=4, enforce_eager=True))
    try:
        res = {"on": await session(llm, "s-on", None),
               "off": await session(llm, "s-off", {"kvshrink": {"method": "none"}})}
    finally:
        llm.shutdown()
    print("RESULT " + json.dumps(res))

if __name__ == "__main__":
    asyncio.run(main())
'''


def _start(tmp_path, model_path, env: dict) -> subprocess.Popen:
    path = tmp_path / "stream.py"
    path.write_text(SCRIPT)
    full = plugin_free_env()
    full.update(env)
    return subprocess.Popen([sys.executable, str(path), model_path], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_streaming_input_sessions(tmp_path, model_path):
    # Both engines start at once (an AsyncLLM start is mostly imports in two
    # processes, the front end and the engine core).
    procs = [_start(tmp_path, model_path, {}),
             _start(tmp_path, model_path, {"VLLM_KVSHRINK_METHOD": "snapkv"})]
    stock, ours = (_result(p) for p in procs)
    # Stock serves both sessions.
    assert "outputs" in stock["on"] and "outputs" in stock["off"]
    assert len(stock["off"]["outputs"][-1]) == 12  # 6 tokens per chunk, 2 chunks
    # With compression on, the session is refused by name, with the way out.
    err = ours["on"]["error"]
    assert "streaming-input sessions are not supported" in err
    assert "'method': 'none'" in err
    # Opted out, it is served exactly as stock.
    assert ours["off"] == stock["off"]
