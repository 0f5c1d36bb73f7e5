"""Tests of vllm_kvshrink.config and vllm_kvshrink.envs (no engine, no vLLM import
in-process; the CLI checks run as subprocesses, started together)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kvshrink import envs
from vllm_kvshrink.config import EXTRA_ARGS_KEY, KVShrinkConfig
from vllm_kvshrink.envs import KVShrinkConfigError
from vllm_kvshrink.methods import available_methods

REPO = Path(__file__).resolve().parents[2]
P = envs.PREFIX


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No VLLM_KVSHRINK_* setting of the caller leaks into a test."""
    for k in list(os.environ):
        if k.startswith(P):
            monkeypatch.delenv(k)


def _error(monkeypatch, **settings) -> str:
    for k, v in settings.items():
        monkeypatch.setenv(P + k, v)
    with pytest.raises(KVShrinkConfigError) as ei:
        KVShrinkConfig.from_env()
    return str(ei.value)


# ------------------------------------------------------------------ bad values
def test_unknown_method(monkeypatch):
    msg = _error(monkeypatch, METHOD="bogus")
    assert "VLLM_KVSHRINK_METHOD" in msg
    assert "'bogus'" in msg
    for name in ("none", "streaming", "snapkv"):
        assert name in msg


def test_method_is_case_insensitive(monkeypatch):
    monkeypatch.setenv(P + "METHOD", "SnapKV")
    assert KVShrinkConfig.from_env().method == "snapkv"


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("0", "=0 "),
        ("1.5", "=1.5 "),
        ("-3", "=-3 "),
        ("abc", "'abc'"),
        ("nan", "'nan'"),
        ("NaN", "'NaN'"),
        ("inf", "'inf'"),
        ("0.0", "=0.0 "),
        ("-0.5", "=-0.5 "),
    ],
)
def test_bad_budget(monkeypatch, raw, shown):
    msg = _error(monkeypatch, BUDGET=raw)
    assert "VLLM_KVSHRINK_BUDGET" in msg
    assert shown in msg, msg
    assert "allowed" in msg
    assert "(0, 1]" in msg and ">= 1" in msg


def test_budget_nan_float_rejected_by_config():
    # A NaN float can only come from code; it must not slip through range checks.
    with pytest.raises(KVShrinkConfigError, match="BUDGET"):
        KVShrinkConfig(budget=float("nan"))
    with pytest.raises(KVShrinkConfigError, match="BUDGET"):
        KVShrinkConfig(budget=float("inf"))
    with pytest.raises(KVShrinkConfigError, match="not a number"):
        KVShrinkConfig(budget=True)
    with pytest.raises(KVShrinkConfigError, match="not a number"):
        KVShrinkConfig(budget="0.5")


def test_sink_tokens_not_int(monkeypatch):
    msg = _error(monkeypatch, SINK_TOKENS="x")
    assert "VLLM_KVSHRINK_SINK_TOKENS" in msg
    assert "'x'" in msg
    assert "integer" in msg


def test_sink_tokens_negative(monkeypatch):
    msg = _error(monkeypatch, SINK_TOKENS="-1")
    assert "VLLM_KVSHRINK_SINK_TOKENS=-1" in msg
    assert ">= 0" in msg


def test_inject_fault_rank_below_minus_one(monkeypatch):
    msg = _error(monkeypatch, INJECT_FAULT_RANK="-2")
    assert "VLLM_KVSHRINK_INJECT_FAULT_RANK=-2" in msg and ">= -1" in msg


def test_recent_tokens_zero(monkeypatch):
    msg = _error(monkeypatch, RECENT_TOKENS="0")
    assert "VLLM_KVSHRINK_RECENT_TOKENS=0" in msg
    assert ">= 1" in msg


def test_obs_window_larger_than_recent(monkeypatch):
    msg = _error(monkeypatch, RECENT_TOKENS="8", OBS_WINDOW="9")
    assert "VLLM_KVSHRINK_OBS_WINDOW=9" in msg
    assert "VLLM_KVSHRINK_RECENT_TOKENS=8" in msg
    assert "obs_window <= recent_tokens" in msg


def test_obs_window_equal_recent_ok(monkeypatch):
    monkeypatch.setenv(P + "RECENT_TOKENS", "8")
    monkeypatch.setenv(P + "OBS_WINDOW", "8")
    cfg = KVShrinkConfig.from_env()
    assert (cfg.recent_tokens, cfg.obs_window) == (8, 8)


@pytest.mark.parametrize("k", ["2", "4", "8"])
def test_even_pool_kernel(monkeypatch, k):
    msg = _error(monkeypatch, POOL_KERNEL=k)
    assert f"VLLM_KVSHRINK_POOL_KERNEL={k}" in msg
    assert "odd" in msg


def test_pool_kernel_zero(monkeypatch):
    msg = _error(monkeypatch, POOL_KERNEL="0")
    assert "VLLM_KVSHRINK_POOL_KERNEL=0" in msg
    assert ">= 1" in msg


def test_unknown_variable(monkeypatch):
    msg = _error(monkeypatch, FOO="1")
    assert "VLLM_KVSHRINK_FOO" in msg
    # lists what is allowed
    for name in envs.ENV_VARS:
        assert name in msg


def test_strict_not_bool(monkeypatch):
    msg = _error(monkeypatch, STRICT="maybe")
    assert "VLLM_KVSHRINK_STRICT" in msg
    assert "'maybe'" in msg
    assert "true/false" in msg


# ----------------------------------------------------------------- good values
def test_defaults(monkeypatch):
    cfg = KVShrinkConfig.from_env()
    assert cfg == KVShrinkConfig()
    assert cfg.method == "none" and not cfg.enabled
    assert cfg.budget == 0.25 and isinstance(cfg.budget, float)
    assert (cfg.sink_tokens, cfg.recent_tokens, cfg.slack_tokens) == (4, 32, 32)
    assert (cfg.obs_window, cfg.pool_kernel, cfg.min_prompt_tokens) == (16, 7, 0)
    assert cfg.record_dir == "" and cfg.strict is False


def test_empty_value_means_default(monkeypatch):
    monkeypatch.setenv(P + "BUDGET", "  ")
    monkeypatch.setenv(P + "METHOD", "")
    cfg = KVShrinkConfig.from_env()
    assert cfg.budget == 0.25 and cfg.method == "none"


@pytest.mark.parametrize(
    "raw, value, typ",
    [
        ("0.5", 0.5, float),
        (" 0.125 ", 0.125, float),
        ("1.0", 1.0, float),
        ("36", 36, int),
        ("512", 512, int),
        ("1e3", 1000, int),
        ("2.5e-1", 0.25, float),
    ],
)
def test_budget_types(monkeypatch, raw, value, typ):
    monkeypatch.setenv(P + "BUDGET", raw)
    cfg = KVShrinkConfig.from_env()
    assert cfg.budget == value
    assert type(cfg.budget) is typ


def test_all_good_values(monkeypatch, tmp_path):
    settings = {
        "METHOD": "snapkv",
        "BUDGET": "256",
        "SINK_TOKENS": "0",
        "RECENT_TOKENS": "20",
        "SLACK_TOKENS": "0",
        "OBS_WINDOW": "20",
        "POOL_KERNEL": "1",
        "MIN_PROMPT_TOKENS": "100",
        "RECORD_DIR": str(tmp_path),
        "CACHE_DIR": str(tmp_path),
        "STRICT": "yes",
    }
    for k, v in settings.items():
        monkeypatch.setenv(P + k, v)
    cfg = KVShrinkConfig.from_env()
    assert cfg.enabled
    assert cfg == KVShrinkConfig(
        method="snapkv", budget=256, sink_tokens=0, recent_tokens=20, slack_tokens=0,
        obs_window=20, pool_kernel=1, min_prompt_tokens=100,
        record_dir=str(tmp_path), strict=True,
    )


@pytest.mark.parametrize(
    "raw, value",
    [("1", True), ("true", True), ("ON", True), ("Yes", True),
     ("0", False), ("false", False), ("off", False), ("NO", False)],
)
def test_strict_bool(monkeypatch, raw, value):
    monkeypatch.setenv(P + "STRICT", raw)
    assert KVShrinkConfig.from_env().strict is value


def test_envs_get_with_and_without_prefix(monkeypatch):
    monkeypatch.setenv(P + "SLACK_TOKENS", "9")
    assert envs.get("SLACK_TOKENS") == 9
    assert envs.get("VLLM_KVSHRINK_SLACK_TOKENS") == 9


def test_unknown_variables_sorted(monkeypatch):
    monkeypatch.setenv(P + "ZED", "1")
    monkeypatch.setenv(P + "ABC", "1")
    monkeypatch.setenv(P + "BUDGET", "0.5")
    assert envs.unknown_variables() == [P + "ABC", P + "ZED"]


def test_describe_lists_every_variable(monkeypatch):
    monkeypatch.setenv(P + "BUDGET", "0.5")
    text = envs.describe()
    for name, var in envs.ENV_VARS.items():
        assert name in text
        assert f"[default: {var.default!r}]" in text
    assert "(set: '0.5')" in text


# -------------------------------------------------------------- target_tokens
@pytest.mark.parametrize(
    "budget, n, expected",
    [
        (0.25, 1000, 250),
        (0.25, 1001, 251),  # ceil
        (0.5, 17, 9),
        (1.0, 100, 100),
        (0.01, 10_000, 100),
        (0.3, 1000, 300),
    ],
)
def test_target_tokens_fraction(budget, n, expected):
    cfg = KVShrinkConfig(budget=budget, sink_tokens=2, recent_tokens=3, obs_window=3)
    assert cfg.target_tokens(n) == expected


@pytest.mark.parametrize(
    "budget, n, expected",
    [(512, 10_000, 512), (512, 513, 512), (512, 512, 512), (512, 100, 100), (1, 1, 1)],
)
def test_target_tokens_absolute(budget, n, expected):
    cfg = KVShrinkConfig(budget=budget, sink_tokens=0, recent_tokens=1, obs_window=1)
    assert cfg.target_tokens(n) == expected


def test_target_tokens_floor_and_cap():
    cfg = KVShrinkConfig(budget=0.1, sink_tokens=4, recent_tokens=32)
    # 10% of 100 = 10 < 36 -> floor at sink + recent
    assert cfg.target_tokens(100) == 36
    # never more than the tokens there are
    assert cfg.target_tokens(20) == 20
    assert cfg.target_tokens(36) == 36
    assert cfg.target_tokens(1000) == 100
    cfg = KVShrinkConfig(budget=40, sink_tokens=4, recent_tokens=32)
    assert cfg.target_tokens(1000) == 40
    assert cfg.target_tokens(30) == 30
    for n in range(0, 400):
        t = cfg.target_tokens(n)
        assert t <= n and t == min(n, 40)


@pytest.mark.parametrize("budget", ["1", "35"])
def test_token_count_below_the_kept_floor_is_refused(monkeypatch, budget):
    # "1" is one token, not the whole cache: refused, and the message says
    # how to write a fraction.
    msg = _error(monkeypatch, BUDGET=budget, METHOD="snapkv")
    assert f"VLLM_KVSHRINK_BUDGET={budget}" in msg
    assert "36 tokens always kept" in msg and "1.0 keeps everything" in msg
    monkeypatch.setenv(P + "BUDGET", "1.0")
    assert KVShrinkConfig.from_env().target_tokens(500) == 500


def test_target_tokens_matches_exact_arithmetic_on_integer_products():
    # Fractions with few decimals, checked on sizes where the product is an
    # integer that is not affected by the floor.
    cfg = KVShrinkConfig(budget=0.5, sink_tokens=0, recent_tokens=1, obs_window=1)
    for n in range(1, 300):
        assert cfg.target_tokens(n) == max(1, math.ceil(n / 2))


@pytest.mark.parametrize("budget, n, expected", [(0.07, 100, 7), (0.55, 100, 55),
                                                 (0.28, 100, 28), (0.14, 50, 7)])
def test_target_tokens_fraction_float_roundoff(budget, n, expected):
    cfg = KVShrinkConfig(budget=budget, sink_tokens=0, recent_tokens=1, obs_window=1)
    assert cfg.target_tokens(n) == expected


# ----------------------------------------------------------------- overrides
def test_with_overrides_method_and_budget(monkeypatch):
    monkeypatch.setenv(P + "METHOD", "streaming")
    base = KVShrinkConfig.from_env()
    assert base.with_overrides(None) is base
    assert base.with_overrides({}) is base
    cfg = base.with_overrides({"method": "SnapKV", "budget": 128})
    assert cfg.method == "snapkv" and cfg.budget == 128
    assert base.method == "streaming" and base.budget == 0.25  # unchanged
    cfg = base.with_overrides({"budget": 0.5, "sink_tokens": 0, "recent_tokens": 16,
                               "slack_tokens": 8})
    assert (cfg.budget, cfg.sink_tokens, cfg.recent_tokens, cfg.slack_tokens) == (
        0.5, 0, 16, 8)
    assert cfg.method == "streaming"
    off = base.with_overrides({"method": "none"})
    assert not off.enabled


def test_with_overrides_unknown_key():
    with pytest.raises(KVShrinkConfigError) as ei:
        KVShrinkConfig().with_overrides({"budget": 0.5, "pool_kernel": 3})
    msg = str(ei.value)
    assert f"extra_args[{EXTRA_ARGS_KEY!r}]" in msg
    assert "extra_args['kvshrink']" in msg
    assert "'pool_kernel'" in msg
    for k in KVShrinkConfig.OVERRIDABLE:
        assert k in msg


def test_with_overrides_not_a_dict():
    with pytest.raises(KVShrinkConfigError, match=r"extra_args\['kvshrink'\]"):
        KVShrinkConfig().with_overrides([("budget", 0.5)])


@pytest.mark.parametrize(
    "key, value, shown",
    [
        ("budget", 0, "=0 "),
        ("budget", 2.0, "=2.0 "),
        ("budget", "0.5", "='0.5'"),
        ("method", "bogus", "='bogus'"),
        ("sink_tokens", -1, "=-1 "),
        ("recent_tokens", 0, "=0 "),
    ],
)
def test_with_overrides_bad_value(key, value, shown):
    with pytest.raises(KVShrinkConfigError) as ei:
        KVShrinkConfig().with_overrides({key: value})
    msg = str(ei.value)
    assert f"extra_args['kvshrink'][{key!r}]" in msg
    assert shown in msg, msg
    assert "allowed" in msg
    assert "VLLM_KVSHRINK_" + key.upper() not in msg


def test_with_overrides_conflict_names_both_sources(monkeypatch):
    monkeypatch.setenv(P + "OBS_WINDOW", "16")
    base = KVShrinkConfig.from_env()
    with pytest.raises(KVShrinkConfigError) as ei:
        base.with_overrides({"recent_tokens": 8})
    msg = str(ei.value)
    assert "extra_args['kvshrink']['recent_tokens']=8" in msg
    assert "VLLM_KVSHRINK_OBS_WINDOW=16" in msg


# ----------------------------------------------------------------------- CLI
def test_cli_list():
    """``python -m vllm_kvshrink --list`` as a user runs it (no vLLM import)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(P)}
    p = subprocess.run([sys.executable, "-m", "vllm_kvshrink", "--list"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for m in available_methods():
        assert m in p.stdout
    for name in envs.ENV_VARS:
        assert name in p.stdout


def _check(monkeypatch, capsys, **settings) -> tuple[int, str, str]:
    """``vllm-kvshrink --check`` with exactly ``settings`` in the environment,
    called in this process (the checks it runs are the start-up ones)."""
    from vllm_kvshrink.__main__ import main

    for k in [k for k in os.environ if k.startswith(P)]:
        monkeypatch.delenv(k)
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    rc = main(["--check"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_check_bad_budget(monkeypatch, capsys):
    rc, out, err = _check(monkeypatch, capsys, VLLM_KVSHRINK_BUDGET="7.5")
    assert rc == 2, (out, err)
    assert "VLLM_KVSHRINK_BUDGET" in err
    assert "7.5" in err


def test_cli_check_good(monkeypatch, capsys):
    rc, out, err = _check(monkeypatch, capsys, VLLM_KVSHRINK_METHOD="snapkv",
                          VLLM_KVSHRINK_BUDGET="0.5")
    assert rc == 0, err
    assert out.startswith("ok:")
    assert "method='snapkv'" in out and "budget=0.5" in out


def test_cli_check_accepts_install_time_variables(monkeypatch, capsys):
    # install-time variables the README documents must not stop start-up
    rc, out, err = _check(monkeypatch, capsys, VLLM_KVSHRINK_TARGET="cpu",
                          VLLM_KVSHRINK_DEBIAN_MIRROR="http://deb.debian.org/debian/")
    assert rc == 0, err
    assert "unknown setting" not in err
    assert out.startswith("ok:")


def test_current_is_the_one_configuration_set_for_the_process(monkeypatch):
    """register() builds the configuration once (config.set_current); the
    scheduler and the worker read it, and reading it before is a clear error."""
    from vllm_kvshrink import config

    monkeypatch.setattr(config, "_CURRENT", None)
    with pytest.raises(RuntimeError, match=r"vllm_kvshrink.register\(\) has not run"):
        config.current()
    cfg = KVShrinkConfig(method="snapkv", budget=64)
    config.set_current(cfg)
    monkeypatch.setenv(P + "BUDGET", "128")  # the environment is not read again
    assert config.current() is cfg
