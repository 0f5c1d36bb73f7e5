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
    parser.add_argument("--model", default=None,
                        help="with --list: give each storage form's bytes per token at "
                        "this model's shape (a Hugging Face id or folder; 'default' = "
                        "the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--block-size", type=int, default=32,
                        help="with --list --model: vLLM's block size for tokens per page")
    parser.add_argument("--check", action="store_true",
                        help="validate the current VLLM_KVSHRINK_* settings and "
                        "the vLLM seams the plugin patches")
    args = parser.parse_args(argv)
    if args.check:
        from vllm_kvshrink.config import KVShrinkConfig
        from vllm_kvshrink.serving import compat

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
    print("\n" + _forms(args.model, args.block_size))
    print("\nSettings:\n" + envs.describe())
    return 0


def _forms(model: str | None, block_size: int) -> str:
    from vllm_kvshrink.storage import describe_forms

    if model is None:
        return describe_forms()
    from transformers import AutoConfig

    from vllm_kvshrink.lab.assets import resolve_model

    mc = AutoConfig.from_pretrained(resolve_model(model))
    d = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    rows = mc.num_hidden_layers * getattr(mc, "num_key_value_heads", mc.num_attention_heads)
    head = (f"At {model}'s shape: {mc.num_hidden_layers} layers x {rows // mc.num_hidden_layers}"
            f" KV heads x head_dim {d} ({rows * 4 * d:,} bytes of bf16 K+V per token); "
            f"pages of {block_size} tokens.")
    return head + "\n" + describe_forms(d, block_size, rows)


if __name__ == "__main__":
    sys.exit(main())
