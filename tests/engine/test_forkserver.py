"""The fork server the suite's engine runs go through (bench/forkserver.py):
a child that fails at once is reported, not waited on, and the server goes on
serving."""

from __future__ import annotations

import json

from vllm_kvshrink.lab.bench.forkserver import ForkServer
from vllm_kvshrink.lab.bench.launch import plugin_free_env


def test_a_child_that_fails_at_once_is_reported(tmp_path):
    env = plugin_free_env()
    server = ForkServer(env)
    try:
        for i in range(3):  # both answer lines often arrive in one read
            err = tmp_path / f"err{i}.txt"
            rc = server.run(str(tmp_path / "no-such-spec.json"), str(tmp_path / "out.json"),
                            str(err), env, timeout=120)
            assert rc == 1
            assert "no-such-spec.json" in err.read_text()
        spec = tmp_path / "bad.json"
        spec.write_text(json.dumps({"llm": {"model": str(tmp_path / "no-model")},
                                    "prompts": []}))
        rc = server.run(str(spec), str(tmp_path / "out.json"), str(tmp_path / "e.txt"), env,
                        timeout=300)
        assert rc == 1 and server.alive()
    finally:
        server.close()
    assert not server.alive()
