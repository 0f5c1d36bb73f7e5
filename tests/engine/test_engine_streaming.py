"""The front end in its own process (``AsyncLLM``: the engine core runs in
another process, as under ``vllm serve``).

Streaming-input sessions (``AsyncLLM.generate`` fed by an input stream; vLLM
re-adds the live request to extend it): refused with a clear error when
compression is on for the session, and served as stock when it opts out --
its greedy tokens equal transformers' on the sequence vLLM builds for a
session (each new chunk follows the previous chunks and the output tokens
already computed: all but the last one sampled), fp32.

The same compressing engine then serves two plain requests: the plugin is
registered in the front end and compacts in the engine core's process,
following the scheduler's plans there, and the greedy tokens equal the masked
replay of what was recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_kvshrink.lab.bench.launch import plugin_free_env
from vllm_kvshrink.policy.record import load_events

from vllm_kvshrink.lab.hf.replay import compare_greedy, replay_logits

from engine_checks import check_evictions

pytestmark = pytest.mark.engine

SCRIPT = r'''
import asyncio, json, sys
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.engine.protocol import StreamingInput
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.inputs import TokensPrompt

model = sys.argv[1]
with open(sys.argv[2]) as f:
    inputs = json.load(f)  # {"chunks": a session's chunks, "plain": prompts}

async def session(llm, rid, extra):
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, extra_args=extra)
    async def chunks():
        for ids in inputs["chunks"]:
            yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=ids))
            await asyncio.sleep(0.5)
    out = []
    try:
        async for o in llm.generate(chunks(), sp, rid):
            out.append(list(o.outputs[0].token_ids))
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"outputs": out}

async def plain(llm, rid, ids):
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    async for o in llm.generate(TokensPrompt(prompt_token_ids=ids), sp, rid):
        last = o
    return list(last.outputs[0].token_ids)

async def main():
    import os
    import vllm_kvshrink
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, dtype="float32", max_model_len=1024,
        kv_cache_memory_bytes=64 << 20, block_size=32, max_num_seqs=4, enforce_eager=True))
    try:
        res = {"on": await session(llm, "s-on", None),
               "off": await session(llm, "s-off", {"kvshrink": {"method": "none"}})}
        res["plain"] = await asyncio.gather(*(plain(llm, str(i), p)
                                              for i, p in enumerate(inputs["plain"])))
        res["pid"] = os.getpid()
        res["plugin_active"] = vllm_kvshrink.is_active()
    finally:
        llm.shutdown()
    print("RESULT " + json.dumps(res))

if __name__ == "__main__":
    asyncio.run(main())
'''


#: a streaming session's input chunks
CHUNKS = [list(range(100, 140)), list(range(150, 190))]


def _run(tmp_path, model_path, env: dict, plain: list[list[int]]) -> dict:
    """The script in a fresh interpreter with ``env``: sessions of
    :data:`CHUNKS`, then ``plain`` prompts as plain requests; its result."""
    path = tmp_path / "stream.py"
    path.write_text(SCRIPT)
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"chunks": CHUNKS, "plain": plain}))
    full = plugin_free_env()
    full.update(env)
    proc = subprocess.Popen([sys.executable, str(path), model_path, str(inputs)], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_streaming_sessions_and_the_engine_core_in_its_own_process(tmp_path, model_path,
                                                                   hf_model, essay_prompts):
    record = tmp_path / "record"
    plain = [p[:400] for p in essay_prompts[1:3]]
    ours = _run(tmp_path, model_path, {"VLLM_KVSHRINK_METHOD": "snapkv",
                                       "VLLM_KVSHRINK_BUDGET": "128",
                                       "VLLM_KVSHRINK_SLACK_TOKENS": "16",
                                       "VLLM_KVSHRINK_RECORD_DIR": str(record),
                                       "VLLM_KVSHRINK_STRICT": "1"}, plain)
    # With compression on, the session is refused by name, with the way out.
    err = ours["on"]["error"]
    assert "streaming-input sessions are not supported" in err
    assert "'method': 'none'" in err
    # Opted out, it is served as stock: 6 tokens per chunk, each the greedy
    # token of the sequence vLLM extends the session with.
    out = ours["off"]["outputs"][-1]
    assert len(out) == 12
    first, second = CHUNKS
    for tokens, prompt_len in ((first + out[:6], len(first)),
                               (first + out[:5] + second + out[6:], len(first) + 5 + len(second))):
        verdict = compare_greedy(replay_logits(hf_model, tokens, [], first=prompt_len - 1),
                                 tokens, prompt_len)
        assert verdict["mismatch"] is None or verdict["tie"], verdict
    # Plain requests: registered in the front end, compacted in another
    # process (the engine core's), and equal to the masked replay.
    files = list(record.glob("events-*.jsonl"))
    assert files, "no compaction recorded"
    pids = {int(f.stem.split("-")[1]) for f in files}
    assert ours["plugin_active"]
    assert ours["pid"] not in pids and os.getpid() not in pids
    result = {"outputs": {str(i): {"token_ids": t} for i, t in enumerate(ours["plain"])}}
    events = load_events(record)
    assert set(events) == {"0", "1"}  # the sessions were not compressed
    check_evictions(result, events, hf_model, plain, min_events=2)
