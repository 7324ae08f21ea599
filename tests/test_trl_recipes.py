"""TRL 1.16's other recipes (grpo.py section 9b), each checked against TRL's own code: its
GRPOTrainer._compute_loss runs on the same per-token log-probs, with a stand-in for the trainer around it that
supplies what the loss reads (the log-probs, the config, one process), and the advantages against TRL's formula."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOConfig as TRLConfig
from trl.trainer.grpo_trainer import GRPOTrainer as TRLTrainer

import grpo

N, C = 6, 5
RECIPE_KNOBS = ["sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                "vespo_lambda_neg", "off_policy_mask_threshold", "multi_objective_aggregation"]


def batch(seed: int = 0) -> dict:
    """A micro-batch of N completions of unequal lengths (one empty), off-policy: old and sampling differ from θ."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(N, C, generator=g) * 2
    lengths = torch.tensor([5, 3, 1, 4, 0, 2])
    return dict(logps=logps, old=logps + torch.randn(N, C, generator=g) * 0.4,
                ref=logps + torch.randn(N, C, generator=g) * 0.3, sampling=logps + torch.rand(N, C, generator=g),
                advantages=torch.randn(N, generator=g),
                mask=(torch.arange(C)[None, :] < lengths[:, None]).long(),
                is_ratio=torch.rand(N, C, generator=g) + 0.5)


def trl_loss(b: dict, loss_type: str, level: str, beta: float, S: int, GA: int, threshold=None, vllm=False):
    """TRL's _compute_loss on these tensors: (loss, gradient of every log-prob, its metrics)."""
    logps = b["logps"].clone().requires_grad_(True)
    metrics = defaultdict(list)
    args = TRLConfig.__dataclass_fields__
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.ones(N, C), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=threshold, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28 if loss_type != "cispo" else 5.0,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=True, steps_per_generation=S,
                             **{name: args[name].default for name in RECIPE_KNOBS[:6]}),
        use_vllm=vllm, vllm_importance_sampling_correction=vllm, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=GA, max_completion_length=C, _metrics={"train": metrics},
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                    sync_gradients=True),
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        get_off_policy_mask=TRLTrainer.get_off_policy_mask, get_gamma_weights=TRLTrainer.get_gamma_weights)
    inputs = dict(prompt_ids=torch.zeros(N, 1, dtype=torch.long), prompt_mask=torch.ones(N, 1, dtype=torch.long),
                  completion_ids=torch.zeros(N, C, dtype=torch.long), completion_mask=b["mask"],
                  advantages=b["advantages"], old_per_token_logps=b["old"], ref_per_token_logps=b["ref"],
                  num_items_in_batch=b["mask"].sum() * S)
    if vllm:
        inputs.update(sampling_per_token_logps=b["sampling"], importance_sampling_ratio=b["is_ratio"])
    loss = TRLTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    return loss.item(), logps.grad, {k: v[0] for k, v in metrics.items()}


def our_loss(b: dict, loss_type: str, level: str, beta: float, S: int, GA: int, threshold=None, vllm=False):
    logps = b["logps"].clone().requires_grad_(True)
    recipe = grpo.AlgorithmConfig(off_policy_mask_threshold=threshold)
    loss, metrics = grpo.grpo_loss(
        logps, b["old"], b["ref"], b["advantages"], b["mask"], beta=beta, epsilon_low=0.2,
        epsilon_high=0.28 if loss_type != "cispo" else 5.0, loss_type=loss_type, importance_sampling_level=level,
        max_completion_length=C, gradient_accumulation_steps=GA, steps_per_generation=S,
        num_items_in_batch=float(b["mask"].sum() * S), recipe=recipe,
        importance_sampling_ratio=b["is_ratio"] if vllm else None,
        sampling_per_token_logps=b["sampling"] if vllm else None)
    loss.backward()
    return loss.item(), logps.grad, {k: float(v) for k, v in metrics.items()}


CASES = [(loss_type, level, beta, S, GA) for loss_type, levels in
         (("cispo", ("token", "sequence")), ("sapo", ("token", "sequence")), ("luspo", ("sequence", "token")),
          ("vespo", ("token",)))
         for level in levels for beta in (0.0, 0.04) for S, GA in ((1, 1), (2, 1), (1, 2))]


@pytest.mark.parametrize("loss_type,level,beta,S,GA", CASES)
def test_each_other_loss_type_is_trls_in_value_gradient_and_metrics(loss_type, level, beta, S, GA):
    b = batch()
    ours, theirs = our_loss(b, loss_type, level, beta, S, GA), trl_loss(b, loss_type, level, beta, S, GA)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-6, abs=1e-7)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-7)
    for name in ("cispo_clip_ratio", "vespo/phi_seq_mean", "kl"):
        assert (name in ours[2]) == (name in theirs[2])
        if name in theirs[2]:
            assert ours[2][name] == pytest.approx(theirs[2][name], rel=1e-6)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "vespo"])
@pytest.mark.parametrize("vllm", [False, True])
def test_the_off_policy_mask_is_trls(loss_type, vllm):
    """Without vLLM the gap is measured against π_θ_old, with it against the sampler's log-probs (TRL's rule); each
    threshold keeps some completions with A < 0 and drops others (mean gaps 0.11 against old and 0.28 to 0.93
    against the sampler, for the rows with A < 0)."""
    b, threshold = batch(1), 0.3 if vllm else 0.1
    ours = our_loss(b, loss_type, "token", 0.0, 1, 1, threshold, vllm)
    theirs = trl_loss(b, loss_type, "token", 0.0, 1, 1, threshold, vllm)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-6, abs=1e-7)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-7)
    unmasked = our_loss(b, loss_type, "token", 0.0, 1, 1, None, vllm)
    assert unmasked[0] != pytest.approx(ours[0])  # the mask dropped something


def test_the_off_policy_mask_drops_only_far_completions_with_negative_advantage():
    """Hand-computed: mean gaps log π_sampler - log π_θ of 0.5 (A < 0: dropped), 0.5 (A > 0: kept), 0.1 (kept)."""
    logps = torch.zeros(3, 2)
    sampling = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.2, 0.0]])
    A = torch.tensor([[-1.0], [1.0], [-1.0]])
    keep = grpo.off_policy_mask(logps, sampling, A, torch.ones(3, 2), threshold=0.3)
    assert keep.flatten().tolist() == [0.0, 1.0, 1.0]


def test_the_other_losses_pinned_by_hand():
    """One token, A = 1, log π_θ = log 1.5, log π_old = 0 (r = 1.5):
    cispo (cap 5): -min(r, 5)·A·log π = -1.5·log 1.5; its gradient -1.5 (the weight is a constant);
    sapo (τ = 1): -(4/τ)·σ(τ(r - 1))·A = -4σ(0.5); gradient -4σ'(0.5)·r;
    vespo (k = 2, λ = 3): φ(1.5) = e^3·1.5²·e^-4.5, loss -φ·log 1.5."""
    logp, mask, A = torch.tensor([[math.log(1.5)]]), torch.ones(1, 1, dtype=torch.long), torch.ones(1)
    expected = {"cispo": (-1.5 * math.log(1.5), -1.5),
                "sapo": (-4 / (1 + math.exp(-0.5)), -4 * math.exp(-0.5) / (1 + math.exp(-0.5)) ** 2 * 1.5),
                "vespo": (-math.exp(3 - 4.5) * 2.25 * math.log(1.5), -math.exp(3 - 4.5) * 2.25)}
    for loss_type, (value, gradient) in expected.items():
        x = logp.clone().requires_grad_(True)
        loss, _ = grpo.grpo_loss(x, torch.zeros(1, 1), None, A, mask, loss_type=loss_type, epsilon_high=5.0)
        loss.backward()
        assert (loss.item(), x.grad.item()) == (pytest.approx(value), pytest.approx(gradient)), loss_type


def test_luspo_sums_each_completion_then_averages():
    """LUSPO: 1/N Σ_i Σ_t L_{i,t}; on-policy L = -A per token: rows of 3 and 1 tokens with A = 1 give -(3 + 1)/2."""
    logps = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, _ = grpo.grpo_loss(logps, logps, None, torch.ones(2), mask, loss_type="luspo")
    assert loss.item() == pytest.approx(-2.0)


def test_normalize_then_sum_is_trls():
    """TRL 1.16: each function's rewards become z-scores in their group (std + 1e-4), the weighted sum of those is
    normalised over the batch; a row no function scored gets advantage 0. Two groups of 3, two functions."""
    rewards = torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, math.nan], [0.0, 5.0], [0.0, 5.0], [math.nan, math.nan]])
    weights = torch.tensor([1.0, 0.5])
    ours = grpo.normalize_then_sum(rewards, weights, 3, lambda x: x)
    grouped = rewards.view(-1, 3, 2)
    z = (grouped - torch.nanmean(grouped, 1, keepdim=True)) / (grpo.nanstd(grouped, dim=1)[:, None] + 1e-4)
    z = z.view(-1, 2)
    summed = (z * weights).nansum(1)
    summed[5] = math.nan  # TRL: every function returned None
    expected = torch.nan_to_num((summed - torch.nanmean(summed)) / (grpo.nanstd(summed) + 1e-4), nan=0.0)
    torch.testing.assert_close(ours, expected)
    assert ours[5] == 0.0 and ours[:3].sum() != 0.0


def test_the_recipes_knobs_have_trls_defaults():
    ours, theirs = grpo.GRPOConfig.__dataclass_fields__, TRLConfig.__dataclass_fields__
    assert {name: ours[name].default for name in RECIPE_KNOBS} == {name: theirs[name].default for name in RECIPE_KNOBS}
    assert set(grpo.LOSS_TYPES) == {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"}
