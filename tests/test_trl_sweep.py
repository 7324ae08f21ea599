"""Where a careful reader of TRL 1.16 found us computing something else: each test pins TRL's behaviour (its
formulas checked against trl/trainer/grpo_trainer.py and grpo_config.py of 1.16.0) or our documented difference."""

import functools
import math
import os
import sys

import pytest
import torch

import grpo
from grpo import GRPOConfig, GRPOTrainer

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import letters_data, small_args  # noqa: E402



def test_a_batch_whose_every_completion_is_masked_trains_with_loss_zero(tmp_path, tiny_model_dir):
    """mask_truncated_completions with completions of at most 1 token: every row without EOS is masked, so a whole
    batch can have no token to train on. dapo divides by max(1, T) as TRL does: loss 0, nothing skipped."""
    args = small_args(tmp_path, mask_truncated_completions=True, max_completion_length=1, max_steps=4)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
    masked = []
    generate_and_score = trainer.generate_and_score
    trainer.generate_and_score = lambda rows: masked.append(b := generate_and_score(rows)) or b
    trainer.train()
    empty = [b for b in masked if b.completion_mask.sum() == 0]
    assert empty, "no batch with every completion masked: the test did not reach the case"
    rows = [r for r in trainer.history if "loss" in r]
    assert trainer.checkpoints.bad_steps == 0 and all(math.isfinite(r["loss"]) for r in rows)
    assert 0.0 in [r["loss"] for r in rows]
    loss, _ = grpo.grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, torch.ones(2), torch.zeros(2, 3, dtype=torch.long),
                             num_items_in_batch=0.0)
    assert loss.item() == 0.0


def test_grpo_loss_runs_with_its_own_defaults():
    logps = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    loss, metrics = grpo.grpo_loss(logps, logps.detach(), None, torch.tensor([2.0]), torch.tensor([[1, 1, 0]]))
    assert loss.item() == pytest.approx(-2.0 * 2 / 2)  # dapo over this micro-batch's 2 tokens: -(A·r) summed / 2
    loss.backward()
    assert logps.grad.tolist() == [[-1.0, -1.0, 0.0]]  # -A/T on the tokens under the mask


def test_a_group_whose_every_reward_is_none_has_no_std():
    grouped = torch.tensor([[1.0, 2.0, 3.0], [math.nan] * 3, [5.0, math.nan, math.nan]])
    std = grpo.nanstd(grouped, dim=1)
    assert std[0].item() == 1.0 and math.isnan(std[1]) and math.isnan(std[2])  # TRL's nanstd: NaN below 2 values
    assert grpo.group_advantages(grouped.flatten(), 3).tolist()[3:] == [0.0] * 6


def test_rewards_without_a_name_are_named_as_trl_names_them(tmp_path, tiny_model_dir):
    class Scorer:
        def __call__(self, completions, **kwargs):
            return [1.0] * len(completions)

    partial = functools.partial(grpo.length_reward)
    trainer = GRPOTrainer(tiny_model_dir, [partial, Scorer()], args=small_args(tmp_path, max_steps=1),
                          train_dataset=letters_data())
    assert trainer.reward_names == ["length_reward", "Scorer"]
    trainer.train()
    assert "rewards/Scorer/mean" in trainer.history[-1] and "rewards/length_reward/mean" in trainer.history[-1]


@pytest.mark.parametrize("spelling", [["--learning-rate", "0.002"], ["--learning_rate=0.002"], ["--learning_r", "0.002"]])
def test_the_demo_defaults_never_override_a_flag_however_it_is_spelled(spelling, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(grpo, "GRPOTrainer", lambda **kw: seen.update(kw) or (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        grpo.main([*spelling, "--max_step", "7", "--output_dir", str(tmp_path)])
    assert seen["args"].learning_rate == 0.002 and seen["args"].max_steps == 7
    assert seen["args"].beta == grpo.DEMO_ARGS["beta"]  # the demo's own settings stay where nothing was given


def test_delta_caps_the_ratio_where_the_advantage_is_negative():
    """TRL: coef_1 = clamp(coef_1, max=delta) before -min(coef_1·A, clip(coef_1)·A). Hand-computed, ε = 0.2, δ = 1.5:
    r = 3, A = -1: without δ the loss is -min(-3, -1.2) = 3; with δ it is -min(-1.5, -1.2) = 1.5. For A = +1 the clip
    already holds the loss at -1.2, with or without δ."""
    logps, old = torch.tensor([[math.log(3.0)], [math.log(3.0)]]), torch.zeros(2, 1)
    mask = torch.ones(2, 1, dtype=torch.long)
    for A, plain, capped in ((-1.0, 3.0, 1.5), (1.0, -1.2, -1.2)):
        kw = dict(loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.2)
        assert grpo.grpo_loss(logps[:1], old[:1], None, torch.tensor([A]), mask[:1], **kw)[0].item() == pytest.approx(plain)
        assert grpo.grpo_loss(logps[:1], old[:1], None, torch.tensor([A]), mask[:1], delta=1.5, **kw)[0].item() == \
            pytest.approx(capped)


def test_the_entropy_mask_keeps_the_top_quantile_and_the_kl_everywhere():
    """TRL: threshold = quantile(entropies under the mask, 1 - ρ); the policy term keeps tokens at or above it, and the
    KL term (added after the mask) stays on every token. Entropies 0.1, 0.5, 0.9, 1.3 under the mask, ρ = 0.5: the
    0.5-quantile is 0.7, so the last two tokens keep their policy term."""
    entropies = torch.tensor([[0.1, 0.5, 0.9, 1.3, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    recipes = grpo.Recipes(grpo.RecipeConfig(top_entropy_quantile=0.5))
    keep = recipes.entropy_mask(entropies, mask, gather_uneven=lambda x: x)  # one process: its own tokens
    assert grpo.Recipes().entropy_mask(entropies, mask, lambda x: x) is None  # ρ = 1: every token, no mask
    assert keep.tolist() == [[False, False, True, True, False]]
    logps = torch.zeros(1, 5, requires_grad=True)
    loss, _ = grpo.grpo_loss(logps, logps.detach(), logps.detach() - 1.0, torch.tensor([1.0]), mask, beta=1.0,
                             loss_type="bnpo", entropy_mask=keep, use_bias_correction_kl=False)
    loss.backward()
    # per token: policy -A·r (gradient -1) on the two kept tokens; KL exp(ref-logp)-(ref-logp)-1 (gradient
    # 1 - exp(-1)) on all four; divided by the 4 tokens of the mask
    k = 1 - math.exp(-1.0)
    assert logps.grad.tolist()[0] == pytest.approx([k / 4, k / 4, (k - 1) / 4, (k - 1) / 4, 0.0])


def test_the_entropy_mask_and_the_adaptive_coefficient_read_every_ranks_tokens():
    """Under torchrun both look at the tokens of every rank, as TRL's gather does. This rank's entropies 0.1, 0.5 and
    another rank's 0.9, 1.3: the 0.5-quantile of all four is 0.7, so this rank keeps no token (its own alone: 0.3, and
    it would keep 0.5). The adaptive c: this rank's tokens 0.2, 0.2 and the other's 2.0, 2.0 make a step entropy of
    1.1, above the target 0.5, so c falls by delta (this rank's own 0.2 would have raised it)."""
    other_rank = torch.tensor([0.9, 1.3])
    recipes = grpo.Recipes(grpo.RecipeConfig(top_entropy_quantile=0.5))
    keep = recipes.entropy_mask(torch.tensor([[0.1, 0.5]]), torch.tensor([[1, 1]]),
                                gather_uneven=lambda mine: torch.cat([mine, other_rank]))
    assert keep.tolist() == [[False, False]]
    recipes = grpo.Recipes(GRPOConfig(entropy_coef=0.05, use_adaptive_entropy=True, entropy_coef_delta=0.02,
                                      entropy_target=0.5))
    recipes.entropy_bonus(torch.tensor(0.0), torch.tensor([[0.2, 0.2]]), torch.tensor([[1, 1]]), {})
    coef = recipes.after_step(lambda window: window + torch.tensor([4.0, 2.0]))["entropy_coef"]  # + 2 tokens of 2.0
    assert recipes.last_entropy == pytest.approx(1.1) and coef.item() == pytest.approx(0.03)


def test_generation_kwargs_set_the_sampling_knobs_and_refuse_others():
    args = GRPOConfig(generation_kwargs='{"top_p": 0.9, "temperature": 0.7}')
    assert (args.top_p, args.temperature) == (0.9, 0.7)  # the training logits divide by the same temperature
    with pytest.raises(ValueError, match=r"generation_kwargs has \['num_beams'\], which this sampler does not take"):
        GRPOConfig(generation_kwargs={"num_beams": 4})
    with pytest.raises(ValueError, match="top_p must be in"):
        GRPOConfig(generation_kwargs={"top_p": 0})


def test_chat_template_kwargs_reach_the_template(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if enable_thinking is defined and not enable_thinking %}/nothink{% endif %}")
    prompt = [{"role": "user", "content": "ab="}]
    assert grpo.prompt_to_text(prompt, tokenizer) == "ab="
    assert grpo.prompt_to_text(prompt, tokenizer, {"enable_thinking": False}) == "ab=/nothink"
    ids, _ = grpo.tokenize_prompts([prompt], tokenizer, None, {"enable_thinking": False})
    assert tokenizer.decode(ids[0]) == "ab=/nothink"


@pytest.mark.parametrize("knobs,warmup", [(dict(warmup_steps=3), 3), (dict(warmup_steps=0.25), 3),
                                          (dict(warmup_ratio=0.25), 3), ({}, 0)])
def test_warmup_steps_takes_a_count_or_a_fraction(knobs, warmup, tmp_path, tiny_model_dir):
    args = small_args(tmp_path, max_steps=10, learning_rate=1.0, lr_scheduler_type="constant_with_warmup", **knobs)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
    lrs = []
    for _ in range(5):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    expected = [min(1.0, step / warmup) if warmup else 1.0 for step in range(5)]
    assert lrs == pytest.approx(expected)


def test_evaluation_runs_only_when_eval_strategy_says_so(tmp_path, tiny_model_dir):
    """TRL 1.16 (transformers' TrainingArguments): eval_strategy "no" by default, eval_on_start False; eval_steps
    falls back to logging_steps with eval_strategy="steps"."""
    assert (GRPOConfig().eval_strategy, GRPOConfig().eval_on_start) == ("no", False)
    assert GRPOConfig(eval_strategy="steps", logging_steps=7).eval_steps == 7
    for strategy, evaluated in (("no", []), ("steps", [2, 4])):
        args = small_args(tmp_path / strategy, max_steps=4, logging_steps=2, eval_strategy=strategy)
        trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data(),
                              eval_dataset=letters_data(8))
        trainer.train()
        assert [row["step"] for row in trainer.history if "eval_reward" in row] == evaluated
    with pytest.raises(ValueError, match="Unknown eval_strategy 'epoch'"):
        GRPOConfig(eval_strategy="epoch")


def test_on_a_gpu_part_one_paths_run_unless_chunks_are_asked_for(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Every fast-path threshold was measured on CPUs; a packed row's dense (L, L) mask would also take SDPA off its
    flash kernel. So on CUDA the model keeps Part I's sampling and log-prob pass; chunking, asked for memory, stays."""
    monkeypatch.setattr(grpo, "PACK_FROM_WIDTH", 64)  # the demo's model, as wide as one where packing pays on a CPU
    for chunk, expected in ((0, grpo.get_per_token_logps), (32, grpo.hidden_state_logps)):
        trainer = GRPOTrainer(tiny_model_dir, "letters", args=small_args(tmp_path, logits_chunk_size=chunk),
                              train_dataset=letters_data())
        trainer.device = torch.device("cuda")  # what use_fast_paths reads; nothing runs on it here
        sample, logps = grpo.use_fast_paths(trainer, grpo.sample_with_cache, grpo.get_per_token_logps)
        assert sample is grpo.sample_with_cache
        assert getattr(logps, "func", logps) is expected
        if expected is grpo.hidden_state_logps:
            assert logps.keywords == {"pack": False, "chunk_size": 32}
