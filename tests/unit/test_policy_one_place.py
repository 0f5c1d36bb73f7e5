"""Each rule the engine and the research path share lives once, in
``vllm_kvshrink/policy/``.

The source checks below each run a detector over every module outside the
policy package, and first over a sample of the code the rule replaced, so a
detector that finds nothing cannot pass by being blind.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_kvshrink.config import KVShrinkConfig
from vllm_kvshrink.envs import KVShrinkConfigError
from vllm_kvshrink.policy import cadence
from vllm_kvshrink.policy.checks import check_storage_method, request_config
from vllm_kvshrink.storage.policy import levels_for, plan_tiers

PKG = Path(__file__).resolve().parents[2] / "vllm_kvshrink"
POLICY = PKG / "policy"


def _outside_policy() -> list[tuple[Path, ast.Module]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        if POLICY in path.parents:
            continue
        out.append((path, ast.parse(path.read_text(), str(path))))
    return out


def _hits(detector, modules) -> list[str]:
    return [f"{path.relative_to(PKG.parent)}:{line}"
            for path, tree in modules for line in detector(tree)]


# ------------------------------------------------------------------ detectors
_HEAD_DIM = {"d", "head_dim", "head_size", "hd"}


def _product_terms(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _product_terms(node.left) + _product_terms(node.right)
    return [node]


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def token_bytes_formulas(tree: ast.Module) -> list[int]:
    """Lines multiplying a head dim by 2 (K and V) and by an element size (a
    literal 2 or a name saying bytes / elem): one token's bytes, computed
    again."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)):
            continue
        terms = _product_terms(node)
        if len(terms) < 3:
            continue
        names = [_name(t) for t in terms]
        twos = sum(isinstance(t, ast.Constant) and t.value == 2 for t in terms)
        sized = any(n.endswith("bytes") or n.startswith("elem") for n in names)
        if any(n in _HEAD_DIM for n in names) and twos >= 1 and (twos >= 2 or sized):
            lines.append(node.lineno)
    return sorted(set(lines))


def window_softmaxes(tree: ast.Module) -> list[int]:
    """Functions that take a softmax and mask keys by comparing them with the
    window queries' positions (``... <= query_pos[:, None]``)."""
    lines = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        calls = {_name(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
        causal = any(isinstance(n, ast.Compare) and "query_pos" in ast.unparse(n)
                     for n in ast.walk(fn))
        if "softmax" in calls and causal:
            lines.append(fn.lineno)
    return lines


def record_literals(tree: ast.Module) -> list[int]:
    """Dict literals with an event record's keys, and record file names."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if {"logical_len", "kept"} <= keys:
                lines.append(node.lineno)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith("events-")):
            lines.append(node.lineno)
    return lines


_REFUSALS = ("packs tokens into pages", "streaming-input sessions are not supported",
             "needs an importance method")


def refusal_messages(tree: ast.Module) -> list[int]:
    """String pieces of the refusals :mod:`vllm_kvshrink.policy.checks` owns."""
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and any(r in n.value for r in _REFUSALS)]


#: (detector, a sample of the code the policy function replaced)
DETECTORS = {
    "token bytes": (token_bytes_formulas, """
def nbytes(self, n_tokens, head_dim):
    return n_tokens * 2 * head_dim * 2
def kv_bytes_per_token(cfg, head_dim, dtype_bytes):
    return cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2 * dtype_bytes
"""),
    "window softmax": (window_softmaxes, """
def window_attention(keys, queries, query_pos, scale):
    logits = torch.einsum("hgwd,hnd->hgwn", queries, keys) * scale
    visible = torch.arange(n)[None, :] <= query_pos[:, None]
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
"""),
    "event record": (record_literals, """
def _record(self, comp, kept):
    write({"req_id": comp.req_id, "logical_len": comp.logical_len, "kept": kept})
    path = os.path.join(d, f"events-{os.getpid()}.jsonl")
"""),
    "refusals": (refusal_messages, """
def check(cfg):
    raise KVShrinkConfigError(f"{where}={cfg.storage!r} needs an importance method")
"""),
}


@pytest.mark.parametrize("what", sorted(DETECTORS))
def test_detector_finds_the_replaced_code(what):
    detector, sample = DETECTORS[what]
    assert detector(ast.parse(sample)), f"the {what} detector misses its own sample"


@pytest.mark.parametrize("what", sorted(DETECTORS))
def test_rule_lives_in_the_policy_package_only(what):
    detector, _ = DETECTORS[what]
    assert not _hits(detector, _outside_policy())
    inside = [(p, ast.parse(p.read_text())) for p in sorted(POLICY.glob("*.py"))]
    assert _hits(detector, inside), f"the policy package should hold the {what} rule"


#: functions whose one definition is in policy/ (module level: methods such
#: as ``PagedForm.token_bytes`` count a form's bytes, another quantity)
ONE_DEFINITION = {
    "token_bytes": "nbytes", "request_peak_blocks": "nbytes",
    "tokens_to_keep": "cadence", "bytes_due": "cadence", "budget_bytes": "cadence",
    "loose_bf16": "cadence",
    "query_index": "observation", "plain_rope_inv_freq": "observation",
    "window_probs": "softmax",
    "load_events": "record", "load_epochs": "record", "tier_record": "record",
    "eviction_record": "record",
    "check_cache_dtype": "checks", "check_storage_method": "checks",
    "check_streaming": "checks", "request_config": "checks",
}


def test_shared_functions_are_defined_once():
    where: dict[str, list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in ONE_DEFINITION:
                where.setdefault(node.name, []).append(str(path.relative_to(PKG)))
    for name, module in ONE_DEFINITION.items():
        assert where.get(name) == [f"policy/{module}.py"], (name, where.get(name))
    stacks = [str(p.relative_to(PKG)) for p in sorted(PKG.rglob("*.py"))
              if any(isinstance(n, ast.FunctionDef) and n.name == "stack_layers"
                     for n in ast.parse(p.read_text()).body)]
    assert stacks == ["kernels/layouts.py"]


def test_policy_imports_no_engine_or_model_library():
    code = ("import sys, pkgutil, importlib, vllm_kvshrink.policy as p\n"
            "for m in pkgutil.iter_modules(p.__path__):\n"
            "    importlib.import_module('vllm_kvshrink.policy.' + m.name)\n"
            "print(sorted(x for x in ('vllm', 'transformers', 'triton') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PKG.parent, check=True)
    assert out.stdout.strip() == "[]"


# -------------------------------------------------------------- loose tokens
def _research_region_count(level: torch.Tensor, sinks: int, recent: int) -> int:
    """The research path's former count: bf16 tokens of (layer 0, head 0)
    between the sinks and the recent window, in cache order."""
    n = level.shape[-1]
    return int((level[0, 0, sinks:max(sinks, n - recent)] == 0).sum())


@pytest.mark.parametrize("storage,bf16_free", [(("bf16", "int4_tok", "int2_tok"), True),
                                               (("int4_tok", "int2_tok"), False),
                                               (("bf16", "int8_tok"), True)])
def test_loose_bf16_equals_the_cache_order_count(storage, bf16_free):
    """After any sequence of tier events and appends, counting bf16 tokens
    outside the sinks and recent window in cache order (what the research
    path did) equals :func:`cadence.loose_bf16` of the bf16 and held counts
    (what the engine does): the policy keeps both regions in bf16 and every
    (layer, head) holds the same count per form."""
    levels = levels_for(storage)
    gen = torch.Generator().manual_seed(0)
    l, h, d = 2, 2, 16
    for sinks, recent in ((0, 1), (4, 8), (3, 20)):
        cfg = KVShrinkConfig(method="snapkv", budget=0.5, sink_tokens=sinks,
                             recent_tokens=recent, obs_window=1, storage=storage)
        level = torch.zeros(l, h, 0, dtype=torch.int8)
        for step in range(25):
            grow = int(torch.randint(1, 12, (1,), generator=gen))
            level = torch.cat([level, torch.zeros(l, h, grow, dtype=torch.int8)], 2)
            n = level.shape[-1]
            plain = int((level[0, 0] == 0).sum())
            assert cadence.loose_bf16(cfg, plain, n) == _research_region_count(
                level, sinks, recent)
            if step % 3 != 2 or n <= sinks + recent:
                continue
            scores = torch.rand(l, h, n, generator=gen)
            frac = 0.3 + 0.5 * float(torch.rand(1, generator=gen))
            budget = int(frac * l * h * n * 4 * d) + l * h * (sinks + recent) * 4 * d
            plan = plan_tiers(scores, levels, budget, d, sinks, recent,
                              [0.0] + [0.1 * i for i in range(1, len(levels))],
                              current=level, bf16_free=bf16_free)
            level = plan.level.gather(2, plan.keep())


# ------------------------------------------------------- tiered storage needs a method
def test_a_request_naming_tiered_storage_without_a_method_is_refused():
    base = KVShrinkConfig(method="snapkv")
    with pytest.raises(KVShrinkConfigError) as e:
        request_config(base, {"kvshrink": {"method": "none", "storage": "bf16,int4_tok"}},
                       "auto")
    msg = str(e.value)
    assert "extra_args['kvshrink']['storage']='bf16,int4_tok'" in msg
    assert "extra_args['kvshrink']['method'] is 'none'" in msg
    assert "allowed:" in msg
    # the flat form the OpenAI server carries
    with pytest.raises(KVShrinkConfigError, match="needs an importance method"):
        request_config(base, {"kvshrink_method": "none", "kvshrink_storage": "int4_tok"},
                       "auto")


def test_opting_out_under_global_tiered_storage_is_accepted():
    base = KVShrinkConfig(method="snapkv", storage="bf16,int4_tok")
    cfg = request_config(base, {"kvshrink": {"method": "none"}}, "auto")
    assert not cfg.enabled
    cfg = request_config(base, {"kvshrink": {"storage": "bf16,int2_tok"}}, "auto")
    assert cfg.enabled and cfg.tiered


def test_start_up_and_request_refusals_follow_one_rule(monkeypatch):
    monkeypatch.setenv("VLLM_KVSHRINK_STORAGE", "bf16,int4_tok")
    monkeypatch.delenv("VLLM_KVSHRINK_METHOD", raising=False)
    with pytest.raises(KVShrinkConfigError) as e:
        check_storage_method(KVShrinkConfig.from_env())
    msg = str(e.value)
    assert "VLLM_KVSHRINK_STORAGE='bf16,int4_tok' needs an importance method" in msg
    assert "VLLM_KVSHRINK_METHOD is 'none'" in msg and "allowed:" in msg
