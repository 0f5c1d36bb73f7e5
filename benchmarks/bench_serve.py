#!/usr/bin/env python
"""Stock ``vllm serve`` vs ``vllm serve`` + vllm-kvshrink, measured by ``vllm bench serve``.

Each server runs as its own ``vllm serve`` process, one after the other on the
same port, with the same KV pool in bytes (about ``--pool-seqs`` full
sequences at the model's dtype, so the pool -- not ``--max-num-seqs`` --
limits stock vLLM).  vLLM's own benchmark client (``vllm bench serve``, the
"custom" JSONL dataset of seeded windows of real essay text, no chat template, fixed output length with
``ignore_eos``, greedy, one warm-up request, then every request sent at once)
measures each server, while a small thread polls ``/metrics`` once a second for
the requests running and the KV-cache usage.  Servers run ``--enforce-eager``
(``--compile`` to let vLLM compile), in this order: ``stock`` (no plugin
settings), ``stock_fp8`` (``--kv-cache-dtype fp8``, vLLM's own 2x format, same
pool bytes), ``kvshrink`` (eviction at ``--budget``) and, with ``--storage``
naming forms other than bf16, ``tiers`` (tiered storage as
``VLLM_KVSHRINK_STORAGE``).  ``--ceiling SEQS`` adds ``stock_ceiling`` after
``stock``: stock vLLM with a pool of ``SEQS`` mean sequences, what the memory
alone would buy it on this machine (``output_throughput_ratio_ceiling``) and so
the most a compression fitting that many can buy without attending less
(``output_throughput_kvshrink_vs_ceiling``, ``..._tiers_vs_ceiling``).
``--dtype auto`` (the default) serves bf16 where the CPU computes it natively
(AVX-512 BF16 or AMX) and float32 where it does not, where vLLM's bf16 matrix
products cost the same per sequence at any batch (``bench_gemm_dtype.py``).
Needs pandas (vLLM's custom dataset reads with it).
Prints a table and the ratios (``output_throughput_ratio``: kvshrink / stock,
``output_throughput_ratio_fp8``: kvshrink / stock fp8, ``max_running_ratio``; with
tiers, ``output_throughput_ratio_tiers``: tiers / stock and
``output_throughput_ratio_tiers_vs_eviction``: tiers / kvshrink),
and the seconds the plugin spent per phase during the measured run
(``vllm:kvshrink_seconds_total`` read from ``/metrics`` when it starts and
after it) beside the run's duration (JSON per run: ``kvshrink_seconds``,
``compression_share``); writes a JSON of every raw result and a PNG.

    python benchmarks/bench_serve.py --shape long-generation           # 32 prompts, 1536 out
    python benchmarks/bench_serve.py --shape long-context              # 24 prompts of ~2k
    python benchmarks/bench_serve.py --shape long-generation --quick   # a few minutes
    python benchmarks/bench_serve.py --shape long-generation --budget 0.125 \
        --storage bf16,int8_tok_rot,int4_tok_rot,int2_tok_rot          # adds a tiers server
    python benchmarks/bench_serve.py --shape long-generation --ceiling 8  # + stock, 8 seqs of pool
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllm_kvshrink.lab.bench.launch import plugin_free_env  # noqa: E402
from vllm_kvshrink.lab.bench.machine import (  # noqa: E402
    add_dtype_argument, chosen_dtype, cpu_model, fp8_kv_unavailable)
from vllm_kvshrink.lab.bench.server import (  # noqa: E402
    Server, by_label, free_port, parse_metrics, vllm_command)
from vllm_kvshrink.serving.metrics import phases  # noqa: E402


# Per shape: (num_prompts, min_len, max_len, output_len); --quick replaces them,
# flags given on the command line win over both.
SHAPES = {
    "long-context": dict(num_prompts=24, min_len=1800, max_len=2200, output_len=128),
    "long-generation": dict(num_prompts=32, min_len=200, max_len=300, output_len=1536),
}
QUICK = {
    "long-context": dict(num_prompts=8, min_len=800, max_len=1000, output_len=32, pool_seqs=2),
    "long-generation": dict(num_prompts=8, output_len=384, pool_seqs=2),
}
MODEL_NOTE = ("the embedded default model is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF, "
              "dequantized to bf16")
POLLED = {  # /metrics series polled while the benchmark runs (summed over label sets)
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "kv_usage": "vllm:kv_cache_usage_perc",  # a fraction in [0, 1] despite the name
    # plugin gauges of the running requests (absent on a stock server): peak
    "compression_ratio": "vllm:kvshrink_compression_ratio",
    "bytes_ratio": "vllm:kvshrink_bytes_ratio",
}
FINAL = {  # read once after the benchmark
    "preemptions": "vllm:num_preemptions_total",
    "compactions": "vllm:kvshrink_compactions_total",
    "fallbacks": "vllm:kvshrink_fallbacks_total",
    "tokens_evicted": "vllm:kvshrink_tokens_evicted_total",
    "blocks_freed": "vllm:kvshrink_blocks_freed_total",
    "tier_events": "vllm:kvshrink_tier_events_total",
    "tokens_demoted": "vllm:kvshrink_tokens_demoted_total",
}
# A labelled counter appears on /metrics only once it has counted: absent = 0
# on a server with the plugin on.
PLUGIN_COUNTERS = ("compactions", "fallbacks", "tokens_evicted", "blocks_freed")
#: the plugin's seconds per phase (label ``phase``), read when the measured run
#: starts and after it: the difference is what the run cost the plugin.  vLLM
#: 0.32 exports no step or forward time series to set beside it; the run's
#: duration is the reference.
SECONDS = "vllm:kvshrink_seconds_total"


def phase_seconds(server: Server) -> dict[str, float]:
    """The plugin's cumulative seconds per phase on ``server`` now ({} on a
    stock server or when /metrics does not answer)."""
    try:
        return by_label(server.metrics(), SECONDS, "phase")
    except OSError:
        return {}


class MetricsPoller(threading.Thread):
    """Polls ``/metrics`` every ``interval`` s until stopped: time series of
    :data:`POLLED` (seconds since start); keeps the plugin's seconds per
    phase as they were when the measured run started (:data:`SECONDS`)."""

    def __init__(self, server: Server, interval: float = 1.0):
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.trace: dict[str, list[float]] = {"t": [], **{k: [] for k in POLLED}}
        self.errors = 0
        self.main_start: float | None = None  # s since start, when the main run began
        #: read now, and again when the main run starts (after the warm-up)
        self.seconds_at_start = phase_seconds(server)
        self._stop_evt = threading.Event()
        self._t0 = time.perf_counter()

    def mark_main_start(self) -> None:
        self.main_start = round(time.perf_counter() - self._t0, 2)
        self.seconds_at_start = phase_seconds(self.server) or self.seconds_at_start

    def run(self) -> None:
        t0 = self._t0
        while not self._stop_evt.is_set():
            t = time.perf_counter()
            try:
                m = parse_metrics(self.server.get("/metrics", timeout=2))
                self.trace["t"].append(round(t - t0, 2))
                for key, name in POLLED.items():
                    self.trace[key].append(m.get(name))
            except OSError:
                self.errors += 1
            self._stop_evt.wait(max(0.0, self.interval - (time.perf_counter() - t)))

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=10)


def _log_tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# stderr lines not worth showing (the whole text still goes to the log): the
# triton build's nanobind leak report at the client's exit
_NOISE = re.compile(r"^(nanobind: | - leaked | - \.\.\. skipped remainder|See https://nanobind)")


def _pass_stderr(stream, log, out=sys.stderr) -> None:
    """Copy ``stream`` (bytes) to ``log`` whole and to ``out`` less :data:`_NOISE`,
    keeping ``\r`` so that tqdm's bar redraws in place."""
    buf = b""
    while True:
        chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
        if not chunk:
            break
        log.write(chunk)
        buf += chunk
        *parts, buf = re.split(rb"(?<=[\r\n])", buf)
        for part in parts:
            text = part.decode(errors="replace")
            if not _NOISE.match(text):
                out.write(text)
        out.flush()
    if buf and not _NOISE.match(buf.decode(errors="replace")):
        out.write(buf.decode(errors="replace") + "\n")
    log.flush()


def run_bench(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float,
              on_main_start=None) -> float:
    """Run ``vllm bench serve``: stdout echoed (indented) and kept in ``log_path``,
    stderr (its progress bar) passed through and kept beside it; ``on_main_start()``
    is called when it says the measured run starts (after its warm-up); wall seconds."""
    err_path = log_path.with_suffix(".stderr.log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log, open(err_path, "wb") as err_log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        assert proc.stdout is not None and proc.stderr is not None
        err_thread = threading.Thread(target=_pass_stderr, args=(proc.stderr, err_log),
                                      daemon=True)
        err_thread.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for raw in proc.stdout:
                line = raw.decode(errors="replace")
                log.write(line)
                if on_main_start is not None and line.startswith("Starting main benchmark run"):
                    on_main_start()
                if not line.startswith("Namespace("):  # its parsed arguments, in the log
                    print("    " + line, end="", flush=True)
            proc.wait()
            err_thread.join(timeout=10)
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed (exit {proc.returncode}); tail of "
                           f"{log_path}:\n{_log_tail(log_path)}\ntail of {err_path}:\n"
                           f"{_log_tail(err_path)}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=tuple(SHAPES), default="long-generation",
                    help="long-context: ~2k-token prompts, 128 output tokens (24 prompts); "
                    "long-generation: ~256-token prompts, 1536 output tokens (32 prompts)")
    ap.add_argument("--model", default="default", help="model id/path ('default': SmolLM2-135M-Instruct)")
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--slack", default="32", help="VLLM_KVSHRINK_SLACK_TOKENS")
    ap.add_argument("--storage", default="bf16",
                    help="VLLM_KVSHRINK_STORAGE; forms other than bf16 add a 'tiers' server")
    ap.add_argument("--num-prompts", type=int, default=None, help="default per shape")
    ap.add_argument("--min-len", type=int, default=None, help="prompt tokens, default per shape")
    ap.add_argument("--max-len", type=int, default=None, help="prompt tokens, default per shape")
    ap.add_argument("--output-len", type=int, default=None, help="default per shape")
    ap.add_argument("--pool-seqs", type=float, default=None,
                    help="KV pool in full sequences (prompt+output of average length, at "
                    "the model dtype's bytes); default 4 (2 with --quick)")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--ceiling", type=float, default=None, metavar="SEQS",
                    help="also run stock vLLM with a pool of SEQS mean sequences "
                         "(server stock_ceiling): the throughput the memory alone buys "
                         "stock vLLM on this machine, the ceiling for a compression that "
                         "fits that many")
    add_dtype_argument(ap, "every server's --dtype")
    ap.add_argument("--max-concurrency", type=int, default=None,
                    help="vllm bench serve --max-concurrency (default: none, all at once)")
    ap.add_argument("--num-warmups", type=int, default=1,
                    help="vllm bench serve --num-warmups: requests (the first prompt, full "
                    "output) sent before the measured run, so first-use costs (e.g. of a "
                    "storage form) stay out of it; 0 = none")
    ap.add_argument("--compile", action="store_true",
                    help="let vLLM compile the model (default: --enforce-eager, faster start)")
    ap.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--bench-timeout", type=float, default=7200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="short version (a few minutes)")
    ap.add_argument("--out", default=None, help="output folder (default results/bench_serve_<shape>)")
    ap.add_argument("--json", dest="json_path", help="figures JSON (default in --out)")
    ap.add_argument("--plot", default=None, help="PNG path (default in --out)")
    args = ap.parse_args()
    given = {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
    defaults = {**SHAPES[args.shape], "pool_seqs": 4.0}
    if args.quick:
        defaults.update(QUICK[args.shape])
    for name, value in defaults.items():
        if "--" + name.replace("_", "-") not in given:
            setattr(args, name, value)
    if args.min_len > args.max_len or args.num_prompts < 1 or args.output_len < 1:
        ap.error("need --min-len <= --max-len, --num-prompts >= 1, --output-len >= 1")
    if args.pool_seqs <= 0:
        ap.error("--pool-seqs must be > 0 (the pool must limit stock vLLM)")
    if args.ceiling is not None and args.ceiling <= args.pool_seqs:
        ap.error(f"--ceiling {args.ceiling} must be above --pool-seqs {args.pool_seqs} "
                 f"(it is the pool of the stock_ceiling server, in mean sequences)")
    args.dtype = chosen_dtype(args.dtype)

    from vllm_kvshrink.storage import parse_storage

    try:
        storage = parse_storage(args.storage, "--storage")
    except ValueError as e:
        ap.error(str(e))
    tiered = storage != ("bf16",)
    try:
        vllm_cmd = vllm_command()
    except RuntimeError as e:
        ap.error(str(e))
    if importlib.util.find_spec("pandas") is None:  # the CPU wheel's vllm bench hides this
        ap.error("vllm bench serve's custom dataset reads its JSONL with pandas (vLLM's "
                 "'bench' extra), which is not installed: pip install pandas")

    from transformers import AutoTokenizer

    from vllm_kvshrink.lab.assets import DEFAULT_MODEL_NAME, MODEL_ALIASES, resolve_model
    from vllm_kvshrink.lab.bench.workload import build_workload, kv_bytes_per_token

    out = Path(args.out) if args.out else REPO / "results" / f"bench_serve_{args.shape}"
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json_path) if args.json_path else out / f"bench_serve_{args.shape}.json"
    plot_path = Path(args.plot) if args.plot else out / f"bench_serve_{args.shape}.png"

    # ---- the workload: one JSONL for every server
    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    windows = build_workload(tok, args.num_prompts, args.min_len, args.max_len, args.seed)
    texts = [tok.decode(w) for w in windows]
    # what the server and the client count: the text re-tokenized as sent
    lens = [len(tok(t).input_ids) for t in texts]
    dataset = out / "prompts.jsonl"
    with open(dataset, "w") as f:
        for t in texts:
            f.write(json.dumps({"prompt": t, "output_tokens": args.output_len}) + "\n")
    mean_prompt = statistics.mean(lens)
    mean_seq = mean_prompt + args.output_len
    per_tok = kv_bytes_per_token(model, 4 if args.dtype == "float32" else 2)
    max_model_len = max(lens) + args.output_len + args.block_size
    pool_tokens = max(int(args.pool_seqs * mean_seq), max_model_len + args.block_size)
    pool_bytes = pool_tokens * per_tok
    stock_fit = pool_tokens / mean_seq
    max_num_seqs = max(args.num_prompts, math.ceil(4 * stock_fit))
    try:  # rough: kept tokens ~ budget share (or count) of each sequence, plus slack
        b = float(args.budget)
        kept = (b * mean_seq if b <= 1 else min(b, mean_seq)) + float(args.slack)
        ours_fit = pool_tokens / min(kept, mean_seq)
    except ValueError:
        ours_fit = float("nan")
    fp8_x = per_tok // kv_bytes_per_token(model, 1)
    print(f"workload: {args.num_prompts} prompts of {args.min_len}-{args.max_len} essay tokens "
          f"(as sent: {min(lens)}-{max(lens)}, mean {mean_prompt:.0f}), {args.output_len} "
          f"output tokens, ignore_eos; KV pool {pool_tokens} tokens = {stock_fit:.1f} mean "
          f"sequences ({pool_bytes / 2**20:.1f} MiB {args.dtype}; fp8 holds {fp8_x}x), block "
          f"{args.block_size}, max-model-len {max_model_len}, max-num-seqs {max_num_seqs}",
          flush=True)
    if args.num_prompts <= stock_fit:
        print(f"  note: {args.num_prompts} prompts all fit the pool at once (~{stock_fit:.1f}): "
              f"the pool does not limit stock vLLM; lower --pool-seqs", flush=True)
    elif math.isfinite(ours_fit) and args.num_prompts <= ours_fit:
        print(f"  note: {args.num_prompts} prompts may all fit at once under compression "
              f"(~{ours_fit:.0f}); raise --num-prompts or lower --pool-seqs", flush=True)

    # ---- the servers
    port = args.port or free_port()
    clean = plugin_free_env()

    def serve_args_for(pool: int) -> list[str]:
        a = ["--dtype", args.dtype, "--block-size", str(args.block_size),
             "--max-model-len", str(max_model_len), "--kv-cache-memory-bytes", str(pool),
             "--max-num-seqs", str(max_num_seqs), "--seed", str(args.seed)]
        return a if args.compile else a + ["--enforce-eager"]

    serve_args = serve_args_for(pool_bytes)
    ceiling_bytes = (int(args.ceiling * mean_seq) * per_tok if args.ceiling is not None
                     else None)
    ours_env = {"VLLM_KVSHRINK_METHOD": args.method, "VLLM_KVSHRINK_BUDGET": str(args.budget),
                "VLLM_KVSHRINK_SLACK_TOKENS": str(args.slack)}
    servers = [("stock", {}, []), ("stock_fp8", {}, ["--kv-cache-dtype", "fp8"]),
               ("kvshrink", ours_env, [])]
    if ceiling_bytes is not None:
        servers.insert(1, ("stock_ceiling", {}, []))
    if tiered:
        servers.append(("tiers", {**ours_env, "VLLM_KVSHRINK_STORAGE": ",".join(storage)}, []))
    no_fp8 = fp8_kv_unavailable()
    if no_fp8:
        print(f"stock_fp8 left out: {no_fp8}", flush=True)
        servers = [s for s in servers if s[0] != "stock_fp8"]

    runs: dict[str, dict] = {}
    t_all = time.perf_counter()
    for name, env_over, extra in servers:
        result_file = out / f"{name}.json"
        result_file.unlink(missing_ok=True)
        bench_cmd = [
            vllm_cmd, "bench", "serve", "--backend", "openai", "--host", "127.0.0.1",
            "--port", str(port), "--model", model, "--tokenizer", model,
            "--dataset-name", "custom", "--dataset-path", str(dataset),
            "--custom-output-len", str(args.output_len), "--skip-chat-template",
            "--disable-shuffle", "--ignore-eos", "--temperature", "0",
            "--num-prompts", str(args.num_prompts), "--request-rate", "inf",
            "--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--label", name, "--save-result",
            "--result-dir", str(out), "--result-filename", result_file.name,
        ]
        if args.max_concurrency:
            bench_cmd += ["--max-concurrency", str(args.max_concurrency)]
        if args.num_warmups:
            bench_cmd += ["--num-warmups", str(args.num_warmups)]
        settings = " ".join(f"{k}={v}" for k, v in env_over.items()) or "no plugin settings"
        print(f"\nstarting server {name} ({settings}{' ' + ' '.join(extra) if extra else ''}) "
              f"on port {port} ...", flush=True)
        own = serve_args_for(ceiling_bytes) if name == "stock_ceiling" else serve_args
        server = Server(model, own + extra, env_over, out / f"{name}.server.log",
                        start_timeout=args.startup_timeout, port=port)
        with server:
            startup_s = server.startup_s
            print(f"  {name} healthy after {startup_s:.0f} s; running vllm bench serve ...",
                  flush=True)
            poller = MetricsPoller(server)
            poller.start()
            try:
                bench_s = run_bench(bench_cmd, {**clean, "PYTHONUNBUFFERED": "1"},
                                    out / f"{name}.bench.log", args.bench_timeout,
                                    on_main_start=poller.mark_main_start)
            finally:
                poller.stop()
            time.sleep(1.5)  # let the last stats reach /metrics
            try:
                final_m = parse_metrics(server.metrics())
            except OSError:
                final_m = {}
            spent = phases.since(poller.seconds_at_start, phase_seconds(server))
            t_stop = time.perf_counter()
        stop_s = time.perf_counter() - t_stop
        bench = json.loads(result_file.read_text())
        tr = poller.trace
        final = {k: final_m[n] for k, n in FINAL.items() if n in final_m}
        if env_over:
            for k in PLUGIN_COUNTERS:
                final.setdefault(k, 0.0)
        running = [v or 0.0 for v in tr["running"]]
        # the samples of the measured run while requests were in the server (the
        # client's start-up, warm-up and exit are in the trace too)
        main_t = poller.main_start if poller.main_start is not None else 0.0
        active = [i for i, v in enumerate(running)
                  if v + (tr["waiting"][i] or 0.0) > 0 and tr["t"][i] >= main_t]
        act_run = [running[i] for i in active]
        t_first = tr["t"][active[0]] if active else 0.0
        kv_tokens = re.findall(r"KV cache size: ([\d,]+) tokens",
                               _log_tail(out / f"{name}.server.log", 10**7))
        peaks = {f"peak_{k}": max((tr[k][i] for i in active if tr[k][i] is not None),
                                  default=None)
                 for k in ("compression_ratio", "bytes_ratio")}
        wall = startup_s + bench_s + stop_s
        runs[name] = {
            "env": env_over, "extra_args": extra, "bench": bench, "trace": tr,
            "poll_errors": poller.errors, "final_metrics": final,
            "startup_s": startup_s, "bench_wall_s": bench_s, "stop_s": stop_s,
            "wall_s": wall,
            "bench_share_of_wall": bench.get("duration", 0) / wall if wall else 0.0,
            "kvshrink_seconds": spent,
            "compression_share": phases.share(spent, bench.get("duration", 0)),
            "engine_kv_cache_tokens": int(kv_tokens[-1].replace(",", "")) if kv_tokens else None,
            "max_running": max((running[i] for i in active), default=0.0),
            "median_running": statistics.median(act_run) if act_run else 0.0,
            "mean_running": statistics.mean(act_run) if act_run else 0.0,
            "active_samples": len(active),
            "trace_t_first_active": t_first,
            "trace_t_main_start": poller.main_start,
            "peak_kv_usage": max((tr["kv_usage"][i] or 0.0 for i in active), default=0.0),
            "max_waiting": max((tr["waiting"][i] or 0.0 for i in active), default=0.0),
            **peaks,
        }
        r = runs[name]
        print(f"  {name}: {bench.get('completed')} completed in {bench.get('duration', 0):.1f} s "
              f"({bench.get('output_throughput', 0):.1f} output tok/s); max running "
              f"{r['max_running']:.0f}, median {r['median_running']:.1f} (while busy), peak KV "
              f"{r['peak_kv_usage']:.2f}; start {startup_s:.0f} s, bench {bench_s:.0f} s, "
              f"stop {stop_s:.0f} s", flush=True)
        if spent:
            print(f"  {name} plugin phases: {phases.breakdown(spent)} = "
                  f"{phases.total(spent):.2f} s of the {bench.get('duration', 0):.1f} s run "
                  f"({r['compression_share']:.1%})", flush=True)
    total_s = time.perf_counter() - t_all

    # ---- the table and ratios
    names = list(runs)
    rows = [
        ("output tok/s", lambda r: r["bench"].get("output_throughput"), "{:.1f}"),
        ("requests/s", lambda r: r["bench"].get("request_throughput"), "{:.3f}"),
        ("total tok/s", lambda r: r["bench"].get("total_token_throughput"), "{:.1f}"),
        ("TTFT p50 (ms)", lambda r: r["bench"].get("median_ttft_ms"), "{:.0f}"),
        ("TTFT p99 (ms)", lambda r: r["bench"].get("p99_ttft_ms"), "{:.0f}"),
        ("TPOT p50 (ms)", lambda r: r["bench"].get("median_tpot_ms"), "{:.1f}"),
        ("TPOT p99 (ms)", lambda r: r["bench"].get("p99_tpot_ms"), "{:.1f}"),
        ("completed", lambda r: r["bench"].get("completed"), "{:d}"),
        ("bench duration (s)", lambda r: r["bench"].get("duration"), "{:.1f}"),
        ("max running (polled)", lambda r: r["max_running"], "{:.0f}"),
        ("median running (polled, busy)", lambda r: r["median_running"], "{:.1f}"),
        ("peak KV usage", lambda r: r["peak_kv_usage"], "{:.2f}"),
        ("KV pool (engine tokens)", lambda r: r["engine_kv_cache_tokens"], "{:d}"),
        ("peak compression ratio", lambda r: r["peak_compression_ratio"], "{:.2f}"),
        ("peak bytes ratio", lambda r: r["peak_bytes_ratio"], "{:.2f}"),
        ("preemptions", lambda r: r["final_metrics"].get("preemptions"), "{:.0f}"),
        ("compactions", lambda r: r["final_metrics"].get("compactions"), "{:.0f}"),
        ("tier events", lambda r: r["final_metrics"].get("tier_events"), "{:.0f}"),
        ("fallbacks", lambda r: r["final_metrics"].get("fallbacks"), "{:.0f}"),
        ("server start (s)", lambda r: r["startup_s"], "{:.0f}"),
        ("bench share of wall", lambda r: r["bench_share_of_wall"], "{:.2f}"),
        ("plugin seconds (phases)", lambda r: phases.total(r["kvshrink_seconds"]) or None,
         "{:.2f}"),
        ("plugin share of the run", lambda r: r["compression_share"] or None, "{:.3f}"),
    ]

    def cell(fmt, v):
        if v is None:
            return "-"
        return fmt.format(int(v) if fmt == "{:d}" else v)

    print()
    print("| metric | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for label, get, fmt in rows:
        print(f"| {label} | " + " | ".join(cell(fmt, get(runs[n])) for n in names) + " |")

    def ratio(a: str, b: str, key: str) -> float:
        if a not in runs or b not in runs:  # a run left out (stock fp8 on this CPU)
            return float("nan")
        va = (runs[a]["bench"].get(key) if key != "max_running" else runs[a]["max_running"])
        vb = (runs[b]["bench"].get(key) if key != "max_running" else runs[b]["max_running"])
        return (va / vb) if va is not None and vb else float("nan")

    ratios = {
        "output_throughput_ratio": ratio("kvshrink", "stock", "output_throughput"),
        "output_throughput_ratio_fp8": ratio("kvshrink", "stock_fp8", "output_throughput"),
        "max_running_ratio": ratio("kvshrink", "stock", "max_running"),
        "max_running_ratio_fp8": ratio("kvshrink", "stock_fp8", "max_running"),
        "median_running_ratio": (runs["kvshrink"]["median_running"]
                                 / runs["stock"]["median_running"]
                                 if runs["stock"]["median_running"] else float("nan")),
    }
    if "stock_ceiling" in runs:  # what the memory alone buys stock vLLM, and our share of it
        ratios["output_throughput_ratio_ceiling"] = ratio("stock_ceiling", "stock",
                                                          "output_throughput")
        for ours in ("kvshrink", "tiers"):
            if ours in runs:
                ratios[f"output_throughput_{ours}_vs_ceiling"] = ratio(
                    ours, "stock_ceiling", "output_throughput")
    if tiered:
        ratios.update({
            "output_throughput_ratio_tiers": ratio("tiers", "stock", "output_throughput"),
            "output_throughput_ratio_tiers_vs_eviction": ratio("tiers", "kvshrink",
                                                               "output_throughput"),
            "output_throughput_ratio_tiers_fp8": ratio("tiers", "stock_fp8",
                                                       "output_throughput"),
            "max_running_ratio_tiers": ratio("tiers", "stock", "max_running"),
        })
    print()
    print("  ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    for n in names:
        fm = {k: v for k, v in runs[n]["final_metrics"].items() if k not in ("preemptions",)}
        if fm:
            print(f"{n}: " + ", ".join(f"{k} {v:.2f}" if k.endswith("ratio") else f"{k} {v:.0f}"
                                      for k, v in fm.items()))
    print(f"total wall time {total_s:.0f} s; bench duration / server wall (start + bench + "
          f"stop): " + ", ".join(f"{n} {runs[n]['bench_share_of_wall']:.0%}" for n in names))

    # ---- JSON
    machine = (f"{platform.machine()} {os.cpu_count()} cores, "
               f"{platform.processor() or cpu_model() or 'cpu'}")
    try:
        import torch
        import vllm

        versions = {"vllm": vllm.__version__, "torch": torch.__version__}
    except Exception:  # noqa: BLE001 - versions are informative only
        versions = {}
    figures = {
        "command": [sys.executable, *sys.argv],
        "machine": machine,
        "platform": {"processor": platform.processor(), "cpu_model": cpu_model(),
                     "machine": platform.machine(),
                     "cpu_count": os.cpu_count(), "python": platform.python_version(),
                     "system": platform.platform(), **versions},
        "model": model,
        "model_name": DEFAULT_MODEL_NAME if args.model in MODEL_ALIASES else args.model,
        "model_note": MODEL_NOTE if args.model in MODEL_ALIASES else "",
        "args": vars(args),
        "settings": {"pool_tokens": pool_tokens, "kv_cache_memory_bytes": pool_bytes,
                     "kv_bytes_per_token": per_tok, "dtype": args.dtype, "max_model_len": max_model_len,
                     "max_num_seqs": max_num_seqs, "prompt_lens": lens,
                     "mean_prompt_len": mean_prompt, "stock_fit_seqs": stock_fit,
                     "ceiling_seqs": args.ceiling,
                     "ceiling_kv_cache_memory_bytes": ceiling_bytes,
                     "port": port, "serve_cmd": [vllm_cmd, "serve", model, "--port", str(port), *serve_args], "dataset": str(dataset)},
        **ratios,
        "total_wall_s": total_s,
        "runs": runs,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(figures, indent=1))
    print(f"wrote {json_path}")

    # ---- PNG
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        thr = [runs[n]["bench"].get("output_throughput") or 0 for n in names]
        tpot = [runs[n]["bench"].get("median_tpot_ms") or 0 for n in names]
        colors = [f"C{i}" for i in range(len(names))]
        axes[0].bar(names, thr, color=colors)
        axes[0].set(ylabel="output tokens/s", title="Output throughput")
        axes[1].bar(names, tpot, color=colors)
        axes[1].set(ylabel="ms", title="TPOT p50")
        for i, n in enumerate(names):
            tr = runs[n]["trace"]
            t0 = runs[n]["trace_t_first_active"]
            t_main = runs[n]["trace_t_main_start"] or 0.0  # the warm-up left out
            pts = [(t - t0, v or 0) for t, v in zip(tr["t"], tr["running"]) if t >= t_main]
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], label=n, color=colors[i])
        axes[2].set(xlabel="s since the first request", ylabel="requests running",
                    title="Running requests (/metrics, 1 s)")
        axes[2].legend()
        for ax in axes[:2]:
            ax.tick_params(axis="x", labelsize=8)
        fig.suptitle(f"vllm bench serve, {args.shape}: {Path(model).name}, {args.num_prompts} "
                     f"prompts (mean {mean_prompt:.0f}) + {args.output_len} out, pool "
                     f"{pool_tokens} tokens, {args.method}@{args.budget} ({machine})",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(plot_path, dpi=110)
        print(f"wrote {plot_path}")
    except ImportError:
        print("matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
