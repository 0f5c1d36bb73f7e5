"""``python -m vllm_kvshrink`` / ``vllm-kvshrink``: settings, methods, checks."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from vllm_kvshrink import envs
    from vllm_kvshrink.methods import describe_methods

    parser = argparse.ArgumentParser(
        prog="vllm-kvshrink",
        description="KV-cache compression for vLLM. Turn it on with "
        "VLLM_KVSHRINK_METHOD=<method> and run vLLM as usual.",
    )
    parser.add_argument("--list", action="store_true", help="list methods and settings")
    parser.add_argument("--check", action="store_true",
                        help="validate the current VLLM_KVSHRINK_* settings and "
                        "the vLLM seams the plugin patches")
    args = parser.parse_args(argv)
    if args.check:
        from vllm_kvshrink import compat
        from vllm_kvshrink.config import KVShrinkConfig

        try:
            cfg = KVShrinkConfig.from_env()
            cfg.check_servable()
            compat.check_version()
            compat.check_or_raise()
        except envs.KVShrinkConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"ok: {cfg}\nvLLM {compat.vllm_version()} ({compat.SUPPORTED})")
        return 0
    print("Methods (VLLM_KVSHRINK_METHOD):\n" + describe_methods())
    print("\nSettings:\n" + envs.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
