"""Run the test suite group by group and print each group's duration.

    python tests/run.py                 # every group
    python tests/run.py engine serve    # some groups
    python tests/run.py unit -- -k bytes -x   # extra pytest arguments
    python tests/run.py --lanes 1       # one group at a time

Groups are folders of ``tests/`` sorted by what their tests need.  Each runs
in its own pytest process: the kernels group needs Triton's interpreter
switched on before anything imports Triton, which a process that imported
vLLM (the other groups) has already done.

The groups run in two lanes at once by default: most of the engine group in
one; the others one after another in the second, then the rest of the engine
group (:data:`SECOND_LANE_TAIL`, chosen from measured durations so the lanes
end together).  Each lane runs on its own half of this process's CPUs (one
core each on a 2-core machine), with as many compute threads as it has
cores: vLLM binds an engine's threads to the CPUs it is allowed, so two lanes
sharing every core had their engines' threads pinned onto the same cores,
spinning against each other (engine tests ran 3 to 6 times slower beside the
other lane than alone).  Each group's output is printed when it ends (a line
says when each starts), every group runs even after one fails, and the exit
status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent

#: name -> (what its tests need, extra environment)
GROUPS: dict[str, tuple[str, dict[str, str]]] = {
    "unit": ("no model: bookkeeping, config, storage forms, layouts, imports", {}),
    "kernels": ("Triton's CPU interpreter and the C++ extension, no model",
                {"TRITON_INTERPRET": "1"}),
    "research": ("the default model in transformers (research path, evaluation)", {}),
    "engine": ("vLLM engines, forked from one process that imported vLLM", {}),
    "serve": ("`vllm serve` processes and the OpenAI API", {}),
}

#: the group that runs in a lane of its own (the longest)
ALONE = "engine"

#: test files of that group the second lane runs after the other groups,
#: chosen from measured durations so the lanes end together (on a 2-core AVX2
#: machine, a core per lane: engine lane 557 s, second lane 559 s, the tail
#: 130 s of it; docs/results/test_suite_2026-12-07.log).
SECOND_LANE_TAIL = ("test_forkserver.py", "test_engine_tiers.py")

#: pytest's last line: "543 passed, 1 skipped in 95.83s (0:01:35)" (-q), or
#: the same between "=" bars
_SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|"
                      r"xpassed|warnings?)\b.*?) in [\d.]+s")
_LOCK = threading.Lock()


def _say(text: str) -> None:
    with _LOCK:
        sys.stdout.write(text)
        sys.stdout.flush()


def lane_cpus() -> list[list[int]]:
    """This process's CPUs split in two halves, one per lane (``[]`` with
    fewer than two)."""
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    return [cpus[:half], cpus[half:]] if half else []


def _lane_env(cpus: list[int]) -> dict[str, str]:
    """As many compute threads as the lane has cores."""
    n = str(len(cpus))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def _run(job: tuple[str, str, list[str]], extra: list[str], results: dict, live: bool,
         cpus: list[int] | None = None) -> None:
    """``job``: (name in the table, group, its paths); ``cpus``: the lane's
    CPUs (its processes and their children stay on them)."""
    name, group, paths = job
    env = {**os.environ, **(_lane_env(cpus) if cpus else {}), **GROUPS[group][1]}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths, *extra]
    _say(f"=== {name} started: {GROUPS[group][0]}\n")
    start = time.perf_counter()
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(cmd, env=env, cwd=TESTS.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=pin)
    summary, lines = "", []
    assert proc.stdout is not None
    for line in proc.stdout:
        if live:
            _say(line)
        else:
            lines.append(line)
        m = _SUMMARY.search(line)
        if m:
            summary = m.group(1)
    rc = proc.wait()
    secs = time.perf_counter() - start
    _say("".join(lines) + f"=== {name} finished in {secs:.0f} s: {summary or f'exit {rc}'}\n\n")
    results[name] = (rc, secs, summary)


def _lane(jobs: list, extra: list[str], results: dict, live: bool,
          cpus: list[int] | None = None) -> None:
    for job in jobs:
        _run(job, extra, results, live, cpus)


def _whole(group: str) -> tuple[str, str, list[str]]:
    return group, group, [str(TESTS / group)]


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("groups", nargs="*", metavar="group",
                    help=f"groups to run (default: all): {', '.join(GROUPS)}")
    ap.add_argument("--lanes", type=int, choices=(1, 2), default=2,
                    help="groups running at once (default 2: the engine group "
                         "beside the others)")
    args = ap.parse_args(argv)
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        ap.error(f"unknown test group(s) {', '.join(unknown)}; allowed: {', '.join(GROUPS)}")
    groups = args.groups or list(GROUPS)
    results: dict[str, tuple[int, float, str]] = {}
    # runs both lanes' engine tests compare with are made once (engine/conftest.py)
    shared = tempfile.TemporaryDirectory(prefix="kvshrink-tests-")
    os.environ["KVSHRINK_TEST_SHARED_DIR"] = shared.name
    total = time.perf_counter()
    halves = lane_cpus()
    two = args.lanes == 2 and ALONE in groups and len(groups) > 1 and bool(halves)
    if not two:
        jobs = [_whole(g) for g in groups]
        _lane(jobs, extra, results, live=True)
    else:
        tail = [str(TESTS / ALONE / f) for f in SECOND_LANE_TAIL]
        head = [str(p) for p in sorted((TESTS / ALONE).glob("test_*.py"))
                if p.name not in SECOND_LANE_TAIL]
        first = [(ALONE, ALONE, head)]
        second = [_whole(g) for g in groups if g != ALONE] + [(f"{ALONE}-2", ALONE, tail)]
        jobs = first + second
        lanes = [threading.Thread(target=_lane, args=(first, extra, results, False, halves[0])),
                 threading.Thread(target=_lane, args=(second, extra, results, False,
                                                      halves[1]))]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
    total = time.perf_counter() - total
    print("=== test groups")
    print(f"{'group':<10} {'seconds':>8}  result")
    for name, _, _ in jobs:
        rc, secs, summary = results[name]
        # pytest exits 5 when a selection matched no test: not a failure
        verdict = summary or ("no tests" if rc == 5 else f"exit {rc}")
        print(f"{name:<10} {secs:>8.0f}  {verdict}")
    lanes = "two lanes" if two else "one group at a time"
    print(f"{'all':<10} {total:>8.0f}  wall time, {lanes} ({total / 60:.1f} min)")
    return 0 if all(rc in (0, 5) for rc, _, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
