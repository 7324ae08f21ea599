"""The trainer end to end on the tiny local model: the seed's three examples, evaluation, μ > 1, β > 0,
conversational prompts, LoRA, the command line, and the learning assertion."""

import json
import math
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import grpo
from grpo import GRPOConfig, GRPOTrainer

TRL_METRICS = ["reward", "reward_std", "frac_reward_zero_std", "entropy", "clip_ratio/low_mean",
               "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
               "completions/min_length", "completions/max_length", "completions/clipped_ratio",
               "completions/mean_terminated_length", "num_tokens", "loss", "grad_norm", "learning_rate", "step_time"]


def small_args(tmp_path, **kw) -> GRPOConfig:
    base = dict(output_dir=str(tmp_path / "out"), num_generations=4, per_device_train_batch_size=8,
                max_completion_length=8, learning_rate=1e-3, max_steps=3, logging_steps=1, save_steps=0)
    return GRPOConfig(**{**base, **kw})


def letters_data(n=16):
    return Dataset.from_dict({"prompt": [f"{c}=" for c in "abcdefgh"] * (n // 8)})


def read_metrics(args):
    with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def params(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_a_few_steps_change_the_weights_and_log_trl_metrics(tmp_path, tiny_model_dir):
    args = small_args(tmp_path)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
    before = params(trainer.model)
    history = trainer.train()
    assert trainer.global_step == 3
    assert not torch.equal(before, params(trainer.model))
    rows = read_metrics(args)
    assert rows == history and [r["step"] for r in rows] == [1, 2, 3]
    for name in TRL_METRICS + ["rewards/letters_reward/mean", "rewards/letters_reward/std"]:
        assert name in rows[0], name
    assert rows[-1]["num_tokens"] > rows[0]["num_tokens"]
    # μ = 1 and S = GA: the batch is used inside one optimizer step, so old = new and nothing is clipped.
    assert not trainer.needs_old_logps and rows[0]["clip_ratio/region_mean"] == 0.0
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir)  # the final model, saved with save_pretrained
    torch.testing.assert_close(params(reloaded), params(trainer.model))


def test_seed_example_basic(tmp_path, tiny_model_dir, tokenizer):
    # The seed's "基础使用" example, with the model and dataset pointed at local ones.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dataset = Dataset.from_dict({"prompt": ["tl;dr: the cat sat on the mat.", "tl;dr: rain today."] * 2})

    def reward_func(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]

    training_args = GRPOConfig(output_dir=str(tmp_path / "grpo_results"), num_generations=4, learning_rate=5e-5,
                               num_train_epochs=3, max_completion_length=24)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=reward_func,
                          args=training_args, train_dataset=dataset)
    trainer.train()
    # 4 prompts, B = 8/4 = 2 prompts per generation batch: 2 optimizer steps per epoch, 3 epochs.
    assert trainer.global_step == 6
    assert "rewards/reward_func/mean" in read_metrics(training_args)[-1]


def test_seed_example_two_weighted_reward_functions(tmp_path, tiny_model_dir, tokenizer):
    def reward_length(completions, **kwargs):
        return [len(completion) for completion in completions]

    def reward_diversity(completions, **kwargs):
        return [len(set(completion.split())) for completion in completions]

    args = small_args(tmp_path, max_steps=2)
    trainer = GRPOTrainer(model=tiny_model_dir, processing_class=tokenizer,
                          reward_funcs=[reward_length, reward_diversity], reward_weights=[0.7, 0.3],
                          args=args, train_dataset=letters_data())
    trainer.train()
    row = read_metrics(args)[-1]
    # reward = 0.7 × length + 0.3 × diversity, averaged the same way (both are means over the same rows)
    combined = 0.7 * row["rewards/reward_length/mean"] + 0.3 * row["rewards/reward_diversity/mean"]
    assert row["reward"] == pytest.approx(combined, rel=1e-5)


def test_seed_example_reward_model(tmp_path, tiny_model_dir, tokenizer):
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                         num_labels=1)
    reward_dir = str(tmp_path / "reward-model")
    AutoModelForSequenceClassification.from_config(config).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1)

    args = small_args(tmp_path, max_steps=2)
    trainer = GRPOTrainer(model=tiny_model_dir, processing_class=tokenizer, reward_funcs=reward_model,
                          args=args, train_dataset=letters_data())
    # The score of a completion is the classifier's logit on prompt + completion.
    scores = torch.tensor(grpo.reward_model_scores(reward_model, tokenizer, ["a=", "b="], ["aa", "b"]))
    enc = tokenizer(["a=aa"], return_tensors="pt")
    assert scores[0].item() == pytest.approx(reward_model(**enc).logits[0, 0].item(), abs=1e-5)
    trainer.train()
    assert "rewards/reward-model/mean" in read_metrics(args)[-1]


def test_eval_dataset_logs_eval_reward(tmp_path, tiny_model_dir):
    args = small_args(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=2, logging_steps=3, eval_on_start=True)
    trainer = GRPOTrainer(tiny_model_dir, ["letters", "length"], args=args, train_dataset=letters_data(),
                          eval_dataset=Dataset.from_dict({"prompt": ["a=", "b=", "c="]}))
    trainer.train()
    rows = read_metrics(args)
    # Step 0: the evaluation before training (eval_on_start). Evaluation at step 2 is not a logging step (3): it
    # gets a row of its own, merged into nothing else.
    assert [r["step"] for r in rows] == [0, 2, 3]
    assert all("eval_reward" in r and "reward" not in r for r in rows[:2])
    assert "reward" in rows[2] and "eval_reward" not in rows[2]
    for name in ("eval_rewards/letters_reward/mean", "eval_rewards/length_reward/mean"):
        assert name in rows[0] and name in rows[1]


def test_evaluation_does_not_change_training(tmp_path, tiny_model_dir):
    runs = []
    for eval_dataset in (None, Dataset.from_dict({"prompt": ["a=", "b="]})):
        args = small_args(tmp_path / str(len(runs)), max_steps=2, eval_strategy="steps", eval_steps=1,
                          eval_on_start=True)
        trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data(),
                              eval_dataset=eval_dataset)
        trainer.train()
        runs.append(params(trainer.model))
    assert torch.equal(runs[0], runs[1])


def test_num_iterations_two_uses_old_logps_and_ratio_one_on_first_pass(tmp_path, tiny_model_dir):
    args = small_args(tmp_path, num_iterations=2, max_steps=4, learning_rate=5e-2)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
    assert trainer.needs_old_logps  # GA=1 is not a multiple of S·μ=2: the policy moves between the passes
    batch = trainer.generate_and_score([trainer.train_dataset[i] for i in range(0, 16, 2) for _ in range(4)][:8])
    logps, _ = grpo.get_per_token_logps(trainer.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                        batch.completion_mask, args.temperature)
    torch.testing.assert_close(logps * batch.completion_mask, batch.old_per_token_logps * batch.completion_mask)
    trainer.train()
    rows = read_metrics(args)
    # With a large learning rate the second pass sees a moved policy, and clipping starts to act.
    assert max(r["clip_ratio/region_mean"] for r in rows) > 0


def test_beta_loads_a_frozen_reference_and_logs_kl(tmp_path, tiny_model_dir):
    args = small_args(tmp_path, beta=0.1, max_steps=3)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
    assert trainer.ref_model is not None
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    trainer.train()
    kls = [r["kl"] for r in read_metrics(args)]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # step 1: reference = policy
    assert kls[-1] > 0  # the policy has moved away from the reference


def test_conversational_prompts_go_through_the_chat_template(tmp_path, tiny_model_dir):
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen["prompt"], seen["completion"] = prompts[0], completions[0]
        return [float(len(c[0]["content"])) for c in completions]

    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": c}] for c in "abcdefgh"] * 2})
    trainer = GRPOTrainer(tiny_model_dir, spy, args=small_args(tmp_path, max_steps=1), train_dataset=data)
    trainer.train()
    assert seen["prompt"][0]["role"] == "user"
    assert isinstance(seen["completion"], list) and seen["completion"][0]["role"] == "assistant"
    assert grpo.prompt_to_text(seen["prompt"], trainer.tokenizer) == f"user: {seen['prompt'][0]['content']}\nassistant: "


def test_reward_functions_get_the_other_columns_and_errors_name_the_function(tmp_path, tiny_model_dir):
    data = Dataset.from_dict({"prompt": ["a="] * 8, "answer": ["#### 5"] * 8})
    got = {}

    def uses_answer(prompts, completions, completion_ids, answer, **kwargs):
        got["answer"], got["ids"] = answer, completion_ids
        return [0.0] * len(prompts)

    GRPOTrainer(tiny_model_dir, uses_answer, args=small_args(tmp_path, max_steps=1), train_dataset=data).train()
    assert got["answer"] == ["#### 5"] * 8 and isinstance(got["ids"][0], list)

    def broken(completions, **kwargs):
        raise KeyError("solution")

    with pytest.raises(RuntimeError, match=r"Reward function 'broken' raised KeyError: 'solution'.*first prompt"):
        GRPOTrainer(tiny_model_dir, broken, args=small_args(tmp_path, max_steps=1), train_dataset=data).train()

    def short(completions, **kwargs):
        return [1.0]

    with pytest.raises(ValueError, match=r"'short' must return a list of 8 floats .*got 1"):
        GRPOTrainer(tiny_model_dir, short, args=small_args(tmp_path, max_steps=1), train_dataset=data).train()


def test_builtin_rewards_by_hand():
    assert grpo.length_reward(["x" * 20, "x" * 25]) == [0, -5]
    assert grpo.diversity_reward(["a b a", ""]) == [2.0, 0.0]
    assert grpo.accuracy_reward(["so 3 + 4 = 7", "I think 8", "no idea"], answer=["... #### 7", "#### 1,000", "#### 2"]) \
        == [1.0, 0.0, 0.0]
    assert grpo.accuracy_reward(["1,000"], answer=["#### 1,000"]) == [1.0]
    assert grpo.format_reward(["work...\n#### 42", "#### 42 because", [{"role": "assistant", "content": "#### -3.5"}]]) \
        == [1.0, 0.0, 1.0]
    assert grpo.letters_reward(["c=", "ab=", "c=", "c="], ["ccccc", "bbbbbbb", "", "ddddd"]) == [5.0, 3.0, -5.0, -5.0]


def test_cli_trains_a_gsm8k_style_local_file(tmp_path, tiny_model_dir):
    path = tmp_path / "math.jsonl"
    rows = [{"question": f"What is {a} + {b}?", "answer": f"{a} plus {b}\n#### {a + b}"} for a in range(4) for b in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = grpo.main(["--model_name_or_path", tiny_model_dir, "--dataset_name", str(path),
                         "--reward_funcs", "accuracy", "format", "--reward_weights", "1.0", "0.5",
                         "--num_generations", "4", "--per_device_train_batch_size", "8", "--max_steps", "2",
                         "--max_completion_length", "8", "--logging_steps", "1", "--output_dir", str(tmp_path / "o")])
    assert trainer.global_step == 2 and trainer.reward_names == ["accuracy_reward", "format_reward"]
    assert "rewards/accuracy_reward/mean" in read_metrics(trainer.args)[-1]


def test_lora_reference_is_the_model_with_the_adapter_disabled(tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    args = small_args(tmp_path, beta=0.1, max_steps=3, learning_rate=2e-2)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data(), peft_config=config)
    assert trainer.ref_model is None  # no second copy: the base weights are the reference
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    trainer.train()
    kls = [r["kl"] for r in read_metrics(args)]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0


def test_bf16_autocast_trains_and_keeps_float32_weights(tmp_path, tiny_model_dir):
    args = small_args(tmp_path, bf16=True, max_steps=2, beta=0.1)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
    before = params(trainer.model)
    trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay float32
    assert not torch.equal(before, params(trainer.model))
    row = read_metrics(args)[-1]
    assert math.isfinite(row["loss"]) and math.isfinite(row["kl"]) and math.isfinite(row["entropy"])


def test_a_shortened_demo_still_reports_its_held_out_reward(tmp_path, capsys):
    """--max_steps below the demo's eval_steps (100): no evaluation fell on the last step, and main used to
    fail with an IndexError after training."""
    trainer = grpo.main(["--output_dir", str(tmp_path / "short"), "--max_steps", "3"])
    out = capsys.readouterr().out
    assert trainer.global_step == 3
    assert "held-out prompts" in out and "before training ->" in out


# -- what TRL 1.16 computes, where we say we follow it --------------------------------------------------------


def test_reward_std_is_the_std_of_the_whole_batch_and_lr_grad_norm_are_the_logging_steps(tmp_path, tiny_model_dir):
    def halves(completions, **kwargs):  # each group of 4 scores alike: rows 0-3 get 0, rows 4-7 get 1
        return [float(i >= 4) for i in range(len(completions))]

    args = small_args(tmp_path, max_steps=2, logging_steps=2, lr_scheduler_type="linear")
    trainer = GRPOTrainer(tiny_model_dir, halves, args=args, train_dataset=letters_data())
    trainer.train()
    row = read_metrics(args)[-1]
    # TRL's reward_std is the std of all B·G rewards, Bessel-corrected: std([0,0,0,0,1,1,1,1]) = sqrt(8/28)...
    assert row["reward_std"] == pytest.approx(torch.tensor([0.0] * 4 + [1.0] * 4).std().item())
    assert row["reward_std"] == pytest.approx(math.sqrt(2 / 7))  # ... not the mean within-group std, 0
    assert row["frac_reward_zero_std"] == 1.0
    # learning_rate and grad_norm are the logging step's own (transformers), not the mean over the window:
    # linear decay from 1e-3 over 2 steps uses 1e-3 at step 1 and 5e-4 at step 2.
    assert row["learning_rate"] == pytest.approx(5e-4)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.0  # TrainingArguments' default, not torch's 0.01


def test_num_tokens_counts_truncated_completions_even_when_they_are_masked(tmp_path, tiny_model_dir):
    # max_completion_length = 2: nearly every completion of the random model is cut off and masked out of the loss,
    # but its tokens were still generated and seen, and TRL's num_tokens counts them.
    args = small_args(tmp_path, max_completion_length=2, mask_truncated_completions=True)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
    rows = [trainer.train_dataset[i] for i in (0, 1) for _ in range(4)]
    batch = trainer.generate_and_score(rows)
    lengths, truncated = grpo.completion_mask_from_eos(batch.completion_ids, trainer.eos_token_ids)
    assert truncated.any()
    assert trainer.report.num_tokens == int(batch.prompt_mask.sum() + lengths.sum())
    assert batch.num_items_in_batch == float(lengths[~truncated].sum())  # the loss's count excludes them


@pytest.mark.parametrize("kind", ["numpy array", "numpy scalars", "tensor", "tensor scalars", "tuple of bools"])
def test_reward_functions_may_return_numpy_and_torch_values(tmp_path, tiny_model_dir, kind):
    import numpy as np

    def numeric(completions, **kwargs):
        values = [float(len(c)) for c in completions]
        return {"numpy array": np.array(values, dtype=np.float32), "numpy scalars": [np.int64(v) for v in values],
                "tensor": torch.tensor(values), "tensor scalars": [torch.tensor(v) for v in values],
                "tuple of bools": tuple(v > 4 for v in values)}[kind]

    trainer = GRPOTrainer(tiny_model_dir, numeric, args=small_args(tmp_path, max_steps=1), train_dataset=letters_data())
    rows = [trainer.train_dataset[i] for i in (0, 1) for _ in range(4)]
    batch = trainer.generate_and_score(rows)
    texts, _ = grpo.decode(trainer.tokenizer, [r["prompt"] for r in rows], batch.completion_ids, batch.completion_mask.sum(1))
    lengths = [len(t) for t in texts]
    expected = [float(n > 4) for n in lengths] if kind == "tuple of bools" else [float(n) for n in lengths]
    assert trainer.report.metrics["rewards/numeric/mean"][-1] == pytest.approx(sum(expected) / len(expected))


# -- memory: activation checkpointing, dtype, LoRA from the command line ----------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes_the_layers(tmp_path, tiny_model_dir):
    grads, layer_calls = [], []
    for checkpointing in (False, True):
        args = small_args(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, beta=0.04)
        trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
        assert trainer.model.is_gradient_checkpointing == checkpointing
        torch.manual_seed(0)  # the same completions for both
        # Both run packed, in one forward pass (tests/test_fast_paths.py); with checkpointing it is recomputed.
        batch = trainer.generate_and_score([trainer.train_dataset[i] for i in range(8)])
        calls = []
        # The layer's first module runs again when the backward pass recomputes the layer (recomputation stops once
        # it has every tensor the backward needs, so a late module such as the MLP's last projection may not).
        trainer.model.model.layers[0].input_layernorm.register_forward_hook(lambda *_: calls.append(1))
        trainer.compute_loss(batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]))
        layer_calls.append(len(calls))
    assert layer_calls == [1, 2]  # with checkpointing the layer runs again in the backward pass
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-7)


def test_dtype_bfloat16_loads_bf16_weights_and_keeps_log_probs_and_loss_float32(tmp_path, tiny_model_dir):
    args = small_args(tmp_path, dtype="bfloat16", max_steps=2, beta=0.04, num_iterations=2)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    batch = trainer.generate_and_score([trainer.train_dataset[i] for i in (0, 1) for _ in range(4)])
    assert batch.old_per_token_logps.dtype == batch.ref_per_token_logps.dtype == torch.float32
    assert trainer.compute_loss(batch).dtype == torch.float32
    trainer.optimizer.zero_grad()
    trainer.train()
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["kl"]) for row in read_metrics(args))
    with pytest.raises(ValueError, match="Unknown dtype 'bf16'; choose one of float32, bfloat16, float16, auto"):
        small_args(tmp_path, dtype="bf16")


def test_lora_from_the_command_line(tmp_path, tiny_model_dir):
    pytest.importorskip("peft")
    trainer = grpo.main(["--model_name_or_path", tiny_model_dir, "--dataset_name", "data/letters_chat.jsonl",
                         "--reward_funcs", "letters", "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
                         "--gradient_checkpointing", "--learning_rate", "1e-2",
                         "--lora_target_modules", "q_proj", "v_proj", "--beta", "0.04", "--num_generations", "4",
                         "--per_device_train_batch_size", "8", "--max_completion_length", "4", "--max_steps", "1",
                         "--seed", "1", "--output_dir", str(tmp_path / "lora")])
    # Seed 1 samples completions whose rewards differ within both groups; with equal rewards there would be no
    # gradient to move the adapter (a sampler that draws other numbers may need another seed).
    assert trainer.history[-1]["frac_reward_zero_std"] < 1
    model = grpo.unwrap(trainer.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}  # ...q_proj.lora_A.default.weight
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 8
    assert trainer.ref_model is None  # the reference is the base model: the adapter switched off
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # LoRA's dropout too
    assert os.path.isfile(tmp_path / "lora" / "adapter_model.safetensors")
    # lora_B starts at 0: it moved, so gradients reached the adapter through the checkpointed layers.
    assert model.base_model.model.is_gradient_checkpointing
    assert all(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
