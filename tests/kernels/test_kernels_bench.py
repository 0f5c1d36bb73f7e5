"""The GPU benchmark script runs end to end in its CPU smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_run_all_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels" / "run_all.py"), "--smoke",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    ops = {r["op"] for r in result["rows"]}
    assert ops == {"compaction", "quantize", "dequantize", "merge", "scoring"}
    assert all(r["ok"] for r in result["rows"])
    assert "| compaction | triton in-place |" in (tmp_path / "table.md").read_text()


def test_kernels_import_without_vllm():
    """The GPU machine has no vLLM: the kernels (the engine's and the lab's)
    must not need it."""
    code = ("import sys; import vllm_kvshrink.kernels.quant, vllm_kvshrink.kernels.triton_quant, "
            "vllm_kvshrink.kernels.packed_attention, vllm_kvshrink.kernels.triton_packed, "
            "vllm_kvshrink.lab.kernels.ops, vllm_kvshrink.lab.kernels.cuda_ext; "
            "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_device_check_script_smoke(tmp_path):
    """The one prepared GPU run (benchmarks/device_check.sh) goes through on a
    CPU in smoke mode and leaves the files a device call brings back."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), DEVICE_CHECK_SMOKE="1", PYTHON=sys.executable)
    proc = subprocess.run(["sh", str(ROOT / "benchmarks" / "device_check.sh")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["gpu.txt", "kernels.log", "kernels/fraction_of_copy.png",
                     "kernels/results.json", "kernels/table.md", "micro.json", "micro.log"]
    micro = json.loads((tmp_path / "micro.json").read_text())
    assert micro["predictor_4k_tokens_8_heads_one_layer"] > 0
    assert micro["semantic_grouping_512_tokens_8_heads"] > 0
