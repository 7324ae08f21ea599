"""Invalid configurations are refused at once, with the numbers that disagree and a way to fix them."""

from dataclasses import fields

import pytest

import grpo
from grpo import GRPOConfig, GRPOTrainer

@pytest.mark.parametrize("kwargs,fragments", [
    (dict(num_generations=1), ["num_generations must be in [2, inf), got 1", "a group of one"]),
    (dict(per_device_train_batch_size=6, num_generations=4),
     ["6 × 1 = 6", "not divisible by 4", "num_generations in [2, 3, 6]", "per_device_train_batch_size=8"]),
    (dict(per_device_train_batch_size=3, gradient_accumulation_steps=3, num_generations=2),
     ["3 × 3 = 9", "not divisible by 2"]),
    (dict(per_device_train_batch_size=4, steps_per_generation=2, num_generations=3), ["4 × 2 = 8"]),
    (dict(loss_type="ppo"), ["Unknown loss_type 'ppo'", "grpo, bnpo, dr_grpo, dapo"]),
    (dict(scale_rewards="std"), ["Unknown scale_rewards 'std'", "group, batch, none"]),
    (dict(importance_sampling_level="seq"), ["Unknown importance_sampling_level 'seq'"]),
    (dict(temperature=0.0), ["temperature must be in (0, inf), got 0.0", "all G identical"]),
    (dict(reward_funcs=["length", "format"], reward_weights=[1.0]),
     ["reward_weights has 1 values but there are 2 reward functions", "length, format"]),
    (dict(per_device_train_batch_size=0), ["per_device_train_batch_size must be in [1, inf), got 0"]),
    (dict(gradient_accumulation_steps=0), ["gradient_accumulation_steps must be in [1, inf), got 0"]),
])
def test_invalid_config_is_refused_with_its_numbers(kwargs, fragments):
    with pytest.raises(ValueError) as err:
        GRPOConfig(**kwargs)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_defaults_follow_trl_and_fill_in_derived_values():
    args = GRPOConfig(gradient_accumulation_steps=4, per_device_train_batch_size=2, num_generations=4)
    assert args.steps_per_generation == 4  # defaults to gradient_accumulation_steps, as in TRL
    assert args.generation_batch_size == 8
    assert args.epsilon_high == args.epsilon == 0.2
    assert (args.loss_type, args.scale_rewards, args.beta) == ("dapo", "group", 0.0)


def test_trainer_refuses_weights_that_do_not_match_the_functions(tiny_model_dir, tmp_path):
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": ["a="] * 8})
    args = GRPOConfig(output_dir=str(tmp_path / "unused"), per_device_train_batch_size=4, num_generations=4)
    with pytest.raises(ValueError, match=r"reward_weights has 3 values but there are 1 reward functions \(length_reward\)"):
        GRPOTrainer(tiny_model_dir, "length", args=args, train_dataset=data, reward_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"2 reward_processing_classes for 1 reward_funcs: give one per function"):
        GRPOTrainer(tiny_model_dir, "length", args=args, train_dataset=data, reward_processing_classes=[None, None])
    with pytest.raises(ValueError, match=r"Unknown reward 'lenght'.*length, diversity"):
        GRPOTrainer(tiny_model_dir, "lenght", args=args, train_dataset=data)
    with pytest.raises(ValueError, match=r"no `prompt` column; its columns are \['question'\]"):
        GRPOTrainer(tiny_model_dir, "length", args=args, train_dataset=data.rename_column("prompt", "question"))


def test_help_documents_every_knob(capsys):
    with pytest.raises(SystemExit):
        grpo.main(["--help"])
    out = capsys.readouterr().out
    for f in fields(GRPOConfig):
        assert f"--{f.name}" in out, f"--{f.name} missing from --help"
    assert "completions sampled per prompt" in out  # the help text of num_generations

