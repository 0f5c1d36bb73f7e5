from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _engine_runs_forked():
    """Engine runs fork from one process that imported torch and vLLM once
    (vllm_kvshrink/lab/bench/forkserver.py): the suite's engine tests start a
    few dozen engines, and the import is most of a short run."""
    from vllm_kvshrink.lab.bench import launch

    launch.FORK_SERVER = True
    yield
    launch.FORK_SERVER = False


@pytest.fixture(scope="session")
def model_path() -> str:
    from vllm_kvshrink.lab.assets import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def hf_model(model_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def essay_prompts(tokenizer):
    """Real essay passages of assorted lengths (token ids)."""
    from vllm_kvshrink.lab.assets import load_essays

    essays = load_essays()
    lengths = [900, 520, 333, 700, 61, 1200]
    prompts = []
    for i, n in enumerate(lengths):
        ids = tokenizer(essays[3 + i], add_special_tokens=False)["input_ids"]
        prompts.append(ids[:n])
    return prompts
