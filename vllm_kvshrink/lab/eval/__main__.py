"""``python -m vllm_kvshrink.lab.eval --preset smoke|quick|full --out DIR``."""

from __future__ import annotations

import argparse
import sys

from vllm_kvshrink.lab.eval.presets import PRESETS


def _budget(text: str):
    try:
        return int(text) if text.isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget {text!r} is not a number; allowed: a fraction in (0, 1] or a "
            f"token count >= 1") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_kvshrink.lab.eval",
                                 description="Evaluate KV-cache compression methods x "
                                 "budgets x tasks; resumes from DIR/cells.")
    ap.add_argument("--preset", default="quick", choices=list(PRESETS))
    ap.add_argument("--out", required=True, help="results folder")
    ap.add_argument("--methods", nargs="+", help="override the preset's methods "
                    "('none' is always run as the reference)")
    ap.add_argument("--budgets", nargs="+", type=_budget,
                    help="override the preset's budgets")
    ap.add_argument("--model", nargs="+", default=["default"],
                    help="Hugging Face ids or folders (default: SmolLM2-135M-Instruct); "
                    "with several, each gets its own sub-folder of --out")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    from pathlib import Path

    from vllm_kvshrink.lab.eval.evaluator import EvalError, ResearchEvaluator

    runs = []
    for model in args.model:
        out = Path(args.out)
        if len(args.model) > 1:
            out = out / Path(model.rstrip("/")).name.replace(":", "_")
        try:
            runs.append(ResearchEvaluator(out, preset=args.preset, methods=args.methods,
                                          budgets=args.budgets, model=model,
                                          dtype=args.dtype, seed=args.seed,
                                          threads=args.threads, progress=not args.quiet,
                                          plots=not args.no_plots))
        except EvalError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for ev in runs:  # every setting checked before the first (long) run
        ev.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
