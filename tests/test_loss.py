"""grpo_loss against hand-computed values: identities, clipping, KL and the four normalisations."""

import math

import pytest
import torch

from grpo import grpo_loss

MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])  # completions of 3 tokens and 1 token
ADV = torch.tensor([1.0, -2.0])


def loss_of(logps, old, ref=None, adv=ADV, mask=MASK, **kw):
    kw = {"max_completion_length": 8, "gradient_accumulation_steps": 2, "num_items_in_batch": 10.0, **kw}
    return grpo_loss(logps, old, ref, adv, mask, **kw)


def test_ratio_is_one_when_old_equals_new_but_the_gradient_is_not_zero():
    logps = torch.full((2, 4), -1.5, requires_grad=True)
    loss, metrics = loss_of(logps, logps.detach(), loss_type="bnpo", gradient_accumulation_steps=1)
    # ratio = 1 everywhere, so L_{i,t} = -A_i: tokens -1, -1, -1 (row 0) and +2 (row 1); bnpo: (-3 + 2) / 4
    assert loss.item() == pytest.approx(-0.25)
    loss.backward()
    # d loss / d logp_{i,t} = -A_i · mask / 4: the policy gradient, although the loss value is tiny
    expected = -ADV[:, None] * MASK / 4
    torch.testing.assert_close(logps.grad, expected)
    assert metrics["clip_ratio/region_mean"].item() == 0.0


@pytest.mark.parametrize("loss_type,expected", [
    ("grpo", ((-3 / 3) + (2 / 1)) / 2 / 2),  # mean over sequences of the mean over tokens, / GA
    ("bnpo", (-3 + 2) / 4 / 2),              # over the 4 tokens of the micro-batch, / GA
    ("dr_grpo", (-3 + 2) / (2 * 8) / 2),     # over N × max_completion_length, / GA
    ("dapo", (-3 + 2) / (10 * 2 / 1)),      # over the tokens of one optimizer step: T·GA/S, T = 10, GA = 2, S = 1
])
def test_each_loss_type_equals_its_formula_with_unequal_lengths(loss_type, expected):
    logps = torch.full((2, 4), -0.7)
    loss, _ = loss_of(logps, logps, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected)


@pytest.mark.parametrize("S,GA,divisor", [
    (2, 2, 10),  # S = GA: one generation batch per optimizer step, T = 10 tokens
    (1, 2, 20),  # GA = 2S: two generation batches per step, 2T tokens (the old code divided by 10: twice TRL's loss)
    (2, 1, 5),   # S = 2GA: half a generation batch per step, T/2 tokens (the old code: half TRL's loss)
    (4, 1, 2.5),
])
def test_dapo_divides_by_the_tokens_of_one_optimizer_step(S, GA, divisor):
    logps = torch.full((2, 4), -0.7)
    loss, _ = loss_of(logps, logps, loss_type="dapo", num_items_in_batch=10.0, steps_per_generation=S,
                      gradient_accumulation_steps=GA)
    assert loss.item() == pytest.approx((-3 + 2) / divisor)


def test_dapo_step_gradient_is_the_token_mean_over_the_micro_batches_it_accumulates():
    # GA = 2 micro-batches, each a whole generation batch (S = 1) of 4 tokens: the accumulated loss must be the
    # mean over all 8 tokens. And S = 2, GA = 1: a step sees one micro-batch, the mean over its own 4 tokens.
    # With A = -1 and clipping out of reach, the per-token loss is the ratio r = exp(logp - old) itself.
    per_token = [torch.tensor([[1.0, 2.0, 3.0, 1.0], [4.0, 1.0, 1.0, 1.0]]),
                 torch.tensor([[0.5, 1.0, 1.0, 1.0], [5.0, 6.0, 7.0, 1.0]])]
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]), torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    old, adv = torch.zeros(2, 4), torch.tensor([-1.0, -1.0])
    no_clip = dict(loss_type="dapo", epsilon_low=1.0, epsilon_high=100.0)
    total = sum(grpo_loss(r.log(), old, None, adv, m, num_items_in_batch=4.0, gradient_accumulation_steps=2,
                          steps_per_generation=1, **no_clip)[0] for r, m in zip(per_token, mask))
    assert total.item() == pytest.approx((1 + 2 + 3 + 4 + 0.5 + 5 + 6 + 7) / 8)
    half, _ = grpo_loss(per_token[0].log(), old, None, adv, mask[0], num_items_in_batch=8.0,
                        gradient_accumulation_steps=1, steps_per_generation=2, **no_clip)
    assert half.item() == pytest.approx((1 + 2 + 3 + 4) / 4)


def test_dapo_divides_by_tokens_per_process():
    logps = torch.full((2, 4), -0.7)
    loss, _ = loss_of(logps, logps, loss_type="dapo", num_items_in_batch=20.0, world_size=2,
                      gradient_accumulation_steps=1)
    assert loss.item() == pytest.approx(-1 / 10)


def test_clipping_takes_effect_exactly_where_it_must():
    # One token per row; ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, -1, +1, -1 and ε = 0.2.
    ratios = torch.tensor([[1.5], [0.5], [0.5], [1.5]])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    old = torch.zeros(4, 1)
    logps = ratios.log().clone().requires_grad_(True)
    mask = torch.ones(4, 1, dtype=torch.long)
    loss, metrics = grpo_loss(logps, old, None, adv, mask, loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.2)
    # -min(r·A, clip(r)·A): 1.5·1 -> clipped to 1.2 (loss -1.2); 0.5·-1 -> clipped 0.8 (loss 0.8);
    # 0.5·1 -> 0.5 is smaller than 0.8 (loss -0.5); 1.5·-1 -> -1.5 is smaller than -1.2 (loss 1.5)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5) / 4)
    loss.backward()
    # Clipped tokens get no gradient; the other two get -A·r/4 (d r / d logp = r).
    torch.testing.assert_close(logps.grad.squeeze(1), torch.tensor([0.0, 0.0, -0.5 / 4, 1.5 / 4]))
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(0.25)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(0.25)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(0.5)
    # per completion (one token each): low-clipped shares [0, 1, 0, 0], high-clipped [1, 0, 0, 0]
    assert metrics["clip_ratio/low_min"].item() == 0.0 and metrics["clip_ratio/high_max"].item() == 1.0


def test_asymmetric_clipping_uses_epsilon_high_above():
    logps = torch.tensor([[math.log(1.25)]])
    loss, _ = grpo_loss(logps, torch.zeros(1, 1), None, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.long),
                        loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(-1.25)  # inside 1 + 0.28: not clipped


def test_k3_kl_is_zero_when_ref_equals_policy_and_positive_otherwise():
    # use_bias_correction_kl (the default) multiplies k3 by the ratio, which is 1 here: the same values.
    logps = torch.full((2, 4), -1.0)
    loss0, metrics = loss_of(logps, logps, ref=logps.clone(), beta=0.1, loss_type="bnpo")
    assert metrics["kl"].item() == 0.0
    loss_no_kl, _ = loss_of(logps, logps, loss_type="bnpo")
    assert loss0.item() == pytest.approx(loss_no_kl.item())
    ref = logps + math.log(2.0)  # ref - logp = log 2 on every token: k3 = 2 - log 2 - 1
    k3 = 1 - math.log(2.0)
    loss1, metrics = loss_of(logps, logps, ref=ref, beta=0.1, loss_type="bnpo")
    assert metrics["kl"].item() == pytest.approx(k3)
    assert loss1.item() == pytest.approx(loss_no_kl.item() + 0.1 * k3 / 2)  # bnpo: token mean / GA=2
    assert loss_of(logps, logps, ref=logps - 0.3, beta=0.1)[1]["kl"].item() > 0


def test_sequence_level_importance_ratio_is_the_mean_log_ratio_of_the_sequence():
    old = torch.zeros(2, 4)
    logps = torch.tensor([[0.1, 0.2, 0.3, 5.0], [0.4, 9.0, 9.0, 9.0]])  # masked positions must not count
    adv = torch.tensor([1.0, 1.0])
    loss, _ = grpo_loss(logps, old, None, adv, MASK, loss_type="bnpo", importance_sampling_level="sequence",
                        epsilon_low=10.0, epsilon_high=10.0)
    # row 0: exp(mean(0.1, 0.2, 0.3)) = exp(0.2) on 3 tokens; row 1: exp(0.4) on 1 token
    assert loss.item() == pytest.approx(-(3 * math.exp(0.2) + math.exp(0.4)) / 4)


LN2 = math.log(2.0)


def kl_step(logp, old, ref, corrected, mask=None, level="token"):
    """β = 1, A = 0 (so only the KL term acts), bnpo over the masked tokens, GA = 1: (loss, kl metric, ∇logp)."""
    logp = torch.tensor([logp], requires_grad=True)
    mask = torch.ones_like(logp, dtype=torch.long) if mask is None else mask
    loss, metrics = grpo_loss(logp, torch.tensor([old]), torch.tensor([ref]), torch.zeros(1), mask, beta=1.0,
                              loss_type="bnpo", importance_sampling_level=level, use_bias_correction_kl=corrected)
    loss.backward()
    return loss.item(), metrics["kl"].item(), logp.grad[0].tolist()


def test_kl_bias_correction_on_policy_same_value_different_gradient():
    # logp = old = 0, ref = ln 2: r = 1, k3 = e^{ln 2} - ln 2 - 1 = 1 - ln 2 in both settings.
    # d k3 / d logp = 1 - e^{ref - logp} = 1 - 2 = -1 (plain).
    # d (r·k3) / d logp = r·k3 + r·(1 - e^{ref - logp}) = (1 - ln 2) - 1 = -ln 2 = logp - ref (corrected).
    loss, kl, grad = kl_step([0.0], [0.0], [LN2], corrected=False)
    assert loss == pytest.approx(1 - LN2) and kl == pytest.approx(1 - LN2) and grad == pytest.approx([-1.0])
    loss, kl, grad = kl_step([0.0], [0.0], [LN2], corrected=True)
    assert loss == pytest.approx(1 - LN2) and kl == pytest.approx(1 - LN2) and grad == pytest.approx([-LN2])


def test_kl_bias_correction_off_policy_weights_value_and_gradient_by_the_ratio():
    # old = -ln 2: r = 2. Corrected: kl = 2(1 - ln 2), gradient 2(1 - ln 2) + 2(1 - 2) = -2 ln 2.
    loss, kl, grad = kl_step([0.0], [-LN2], [LN2], corrected=True)
    assert kl == pytest.approx(2 * (1 - LN2)) and loss == pytest.approx(2 * (1 - LN2))
    assert grad == pytest.approx([-2 * LN2])
    loss, kl, grad = kl_step([0.0], [-LN2], [LN2], corrected=False)  # plain k3 ignores the ratio
    assert kl == pytest.approx(1 - LN2) and grad == pytest.approx([-1.0])


def test_kl_bias_correction_at_sequence_level_uses_the_sequence_ratio():
    # Two tokens, log-ratios ln 2 and 0: the sequence ratio s = exp(ln 2 / 2) = √2 weighs each token's k3 = 1 - ln 2.
    # ∂/∂logp_t of (s·k3_1 + s·k3_2)/2 = [(s/2)(k3_1 + k3_2) + s(1 - 2)] / 2 = [√2(1 - ln 2) - √2] / 2 = -√2 ln 2 / 2.
    loss, kl, grad = kl_step([0.0, 0.0], [-LN2, 0.0], [LN2, LN2], corrected=True, level="sequence")
    assert kl == pytest.approx(math.sqrt(2) * (1 - LN2)) and loss == pytest.approx(math.sqrt(2) * (1 - LN2))
    assert grad == pytest.approx([-math.sqrt(2) * LN2 / 2] * 2)


def test_sequence_level_clip_ratios_count_completions_not_tokens():
    # Row 0 (3 tokens) has ratio e^{0.5} > 1.2 with A > 0: clipped; row 1 (1 token) is not. Per completion that is
    # 1 of 2 (TRL's clip_ratio at sequence level); counted per token it would be 3 of 4.
    logps = torch.tensor([[0.5, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    _, metrics = grpo_loss(logps, torch.zeros(2, 4), None, torch.tensor([1.0, 1.0]), MASK,
                           importance_sampling_level="sequence", loss_type="bnpo")
    assert metrics["clip_ratio/high_mean"].item() == 0.5 and metrics["clip_ratio/region_mean"].item() == 0.5
    assert metrics["clip_ratio/high_max"].item() == 1.0
