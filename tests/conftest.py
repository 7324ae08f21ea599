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
