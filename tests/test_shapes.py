"""The jaxtyping annotations are checked while the tests run: a wrong shape is caught with a clear message."""

import os

import pytest
import torch
from jaxtyping import TypeCheckError

import grpo


def test_loss_with_mismatched_completion_lengths_names_the_argument():
    with pytest.raises(TypeCheckError) as err:
        grpo.grpo_loss(torch.zeros(2, 4), torch.zeros(2, 5), None, torch.zeros(2),
                       torch.ones(2, 4, dtype=torch.long), num_items_in_batch=8)
    message = str(err.value)
    assert "grpo_loss" in message and "old_per_token_logps" in message
    assert "f32[2,5]" in message and "N C" in message


def test_advantages_of_the_wrong_rank_are_caught():
    with pytest.raises(TypeCheckError, match="group_advantages"):
        grpo.group_advantages(torch.zeros(4, 2), num_generations=2)


def test_selective_log_softmax_index_must_match_logits():
    with pytest.raises(TypeCheckError, match="index"):
        grpo.selective_log_softmax(torch.zeros(2, 3, 10), torch.zeros(2, 4, dtype=torch.long))


def test_float_ids_are_caught_as_a_dtype_error():
    with pytest.raises(TypeCheckError, match="completion_ids"):
        grpo.completion_mask_from_eos(torch.zeros(2, 3), [1])


def test_rewards_per_function_must_have_one_row_per_completion():
    with pytest.raises(TypeCheckError, match="reward_weights"):
        grpo.weighted_rewards(torch.zeros(6, 2), torch.ones(3))


def test_switched_off_the_checks_are_not_run_and_a_broadcast_goes_through_silently(monkeypatch):
    """With CHECK_SHAPES off the plain function runs, and the bad call that the check catches reaches torch, which broadcasts old log-probs of shape (2, 1) over (2, 4) without complaint: the
    silent kind of bug the checks exist to catch. Here log r = 0 - (-1) = 1 everywhere, r = e is clipped to 1.2,
    A = 1: every token's loss is -1.2, and so is their mean over the 8 tokens."""
    bad_call = (torch.zeros(2, 4), torch.full((2, 1), -1.0), None, torch.ones(2), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeCheckError, match="old_per_token_logps"):
        grpo.grpo_loss(*bad_call, num_items_in_batch=8)
    monkeypatch.setattr(grpo, "CHECK_SHAPES", False)
    loss, _ = grpo.grpo_loss(*bad_call, num_items_in_batch=8)
    assert loss.item() == pytest.approx(-1.2)


@pytest.mark.parametrize("stage,name,shape,symbolic,fragment", [
    ("prompts", "prompt_ids", (7, 3), "BG P", "axis BG should be 8"),
    ("generation", "completion_mask", (8,), "BG C", "promised shape (BG C) but got (8,)"),
    ("rewards", "rewards_per_func", (8, 3), "BG F", "axis F should be 2"),
    ("advantages", "grouped_rewards", (4, 2), "B G", "axis B should be 2"),
    ("log-probs", "per_token_logps", (5, 6), "N C", "axis N should be 4"),
    ("loss", "ratio", (4, 7), "N C", "axis C should be 6"),
])
def test_tracer_refuses_a_shape_its_letters_do_not_allow(stage, name, shape, symbolic, fragment):
    """One planted mismatch per stage: the tracer knows B, G, N, S, F from the config and binds C on sight."""
    with grpo.tracing(B=2, G=4, N=4, S=2, F=2) as shape_trace:
        grpo.trace("generation", {"completion_ids": torch.zeros(8, 6, dtype=torch.long)}, completion_ids="BG C")  # C = 6
        with pytest.raises(ValueError) as err:
            grpo.trace(stage, {name: torch.zeros(shape)}, **{name: symbolic})
    assert f"{stage}/{name}" in str(err.value) and fragment in str(err.value)
    assert [r.name for r in shape_trace.records] == ["completion_ids"]


def test_tracing_is_off_outside_the_block():
    assert grpo._TRACE is None
    grpo.trace("loss", {"ratio": torch.zeros(2)}, ratio="N C")  # a wrong shape, but nobody is tracing: no error
    with grpo.tracing(N=2) as shape_trace:
        grpo.trace("loss", {"ratio": torch.zeros(2, 3)}, ratio="N C", per_token_kl="N C")  # no KL here: left out
    assert grpo._TRACE is None and shape_trace.sizes == {"N": 2, "C": 3}
    assert [r.name for r in shape_trace.records] == ["ratio"]


def test_trace_shapes_from_python_follows_the_data(tmp_path, tiny_model_dir):
    from datasets import Dataset

    args = grpo.GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8,
                           max_completion_length=5, beta=0.1, max_steps=10)
    trainer = grpo.GRPOTrainer(tiny_model_dir, ["letters", "length"], args=args,
                               train_dataset=Dataset.from_dict({"prompt": ["ab=", "c="] * 4}))
    shape_trace = grpo.trace_shapes(trainer)
    assert trainer.global_step == 1
    stages = [r.stage for r in shape_trace.records]
    assert stages == sorted(stages, key=["prompts", "generation", "rewards", "advantages", "log-probs", "loss"].index)
    by_name = {r.name: r for r in shape_trace.records}
    assert by_name["rewards_per_func"].shape == (8, 2)
    assert by_name["grouped_rewards"].shape == (2, 4)
    assert by_name["ref_per_token_logps"].shape == (8, by_name["completion_ids"].shape[1])
    assert "old_per_token_logps" not in by_name  # μ = 1, S = GA: not needed
    assert by_name["logits"].shape[2] == len(trainer.tokenizer)  # Part I's pass
    assert not os.path.exists(os.path.join(str(tmp_path), "model.safetensors"))  # a partial run saves no final model


def test_log_prob_inputs_must_agree(model):
    with pytest.raises(TypeCheckError, match="completion_mask"):
        grpo.get_per_token_logps(model, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long),
                                 torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), 1.0)
