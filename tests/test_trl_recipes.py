"""TRL 1.16's other recipes (grpo.py section 11, class Recipes), each checked against TRL's own code: its
GRPOTrainer._compute_loss runs on the same per-token log-probs, with a stand-in for the trainer around it that
supplies what the loss reads (the log-probs, the config, one process), and the advantages against TRL's formula."""

import functools
import math
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import grpo


def trl():
    """TRL's trainer module, imported when a test first runs: it imports trackio, which reads TRACKIO_DIR once, at
    import, and tests/test_reporting.py points that at a folder of its own."""
    from trl.trainer import grpo_trainer
    return grpo_trainer

N, C = 6, 5
ENTROPY_KNOBS = ["entropy_coef", "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta",
                 "entropy_target"]
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


def trl_stub(logps, entropies, loss_type="dapo", level="token", beta=0.0, S=1, GA=1, threshold=None, vllm=False,
             bonus=None):
    """A stand-in for TRL's trainer with what its _compute_loss reads: these log-probs and entropies, one process, the
    config's defaults; bonus: entropy_coef, use_adaptive_entropy and the other entropy knobs."""
    TRLTrainer, args = trl().GRPOTrainer, trl().GRPOConfig.__dataclass_fields__
    knobs = {name: args[name].default for name in (*RECIPE_KNOBS[:6], *ENTROPY_KNOBS)}
    knobs.update(bonus or {})
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=threshold, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28 if loss_type != "cispo" else 5.0,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=True, steps_per_generation=S, **knobs),
        use_vllm=vllm, vllm_importance_sampling_correction=vllm, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=GA, max_completion_length=C, _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                    sync_gradients=True),
        entropy_coef=knobs["entropy_coef"], use_adaptive_entropy=knobs["use_adaptive_entropy"],
        _entropy_bonus_enabled=knobs["entropy_coef"] != 0 or knobs["use_adaptive_entropy"],
        _last_world_entropy=math.inf, _entropy_window_stats=None, aux_loss_enabled=False,
        get_off_policy_mask=TRLTrainer.get_off_policy_mask, get_gamma_weights=TRLTrainer.get_gamma_weights)


def trl_inputs(b: dict, S: int = 1, vllm: bool = False) -> dict:
    inputs = dict(prompt_ids=torch.zeros(N, 1, dtype=torch.long), prompt_mask=torch.ones(N, 1, dtype=torch.long),
                  completion_ids=torch.zeros(N, C, dtype=torch.long), completion_mask=b["mask"],
                  advantages=b["advantages"], old_per_token_logps=b["old"], ref_per_token_logps=b["ref"],
                  num_items_in_batch=b["mask"].sum() * S)
    if vllm:
        inputs.update(sampling_per_token_logps=b["sampling"], importance_sampling_ratio=b["is_ratio"])
    return inputs


def trl_loss(b: dict, loss_type: str, level: str, beta: float, S: int, GA: int, threshold=None, vllm=False):
    """TRL's _compute_loss on these tensors: (loss, gradient of every log-prob, its metrics)."""
    logps = b["logps"].clone().requires_grad_(True)
    stub = trl_stub(logps, torch.ones(N, C), loss_type, level, beta, S, GA, threshold, vllm)
    loss = trl().GRPOTrainer._compute_loss(stub, None, trl_inputs(b, S, vllm))
    loss.backward()
    return loss.item(), logps.grad, {k: v[0] for k, v in stub._metrics["train"].items()}


def our_loss(b: dict, loss_type: str, level: str, beta: float, S: int, GA: int, threshold=None, vllm=False):
    logps = b["logps"].clone().requires_grad_(True)
    recipes = grpo.Recipes(grpo.RecipeConfig(off_policy_mask_threshold=threshold))
    loss, metrics = grpo.grpo_loss(
        logps, b["old"], b["ref"], b["advantages"], b["mask"], beta=beta, epsilon_low=0.2,
        epsilon_high=0.28 if loss_type != "cispo" else 5.0, loss_type=loss_type, importance_sampling_level=level,
        max_completion_length=C, gradient_accumulation_steps=GA, steps_per_generation=S,
        num_items_in_batch=float(b["mask"].sum() * S), recipes=recipes,
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
    recipes = grpo.Recipes(grpo.RecipeConfig(off_policy_mask_threshold=0.3))
    keep = recipes.off_policy_mask(logps, sampling, A, torch.ones(3, 2))
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
    ours = grpo.Recipes.normalize_then_sum(rewards, weights, 3, lambda x: x)
    grouped = rewards.view(-1, 3, 2)
    z = (grouped - torch.nanmean(grouped, 1, keepdim=True)) / (grpo.nanstd(grouped, dim=1)[:, None] + 1e-4)
    z = z.view(-1, 2)
    summed = (z * weights).nansum(1)
    summed[5] = math.nan  # TRL: every function returned None
    expected = torch.nan_to_num((summed - torch.nanmean(summed)) / (grpo.nanstd(summed) + 1e-4), nan=0.0)
    torch.testing.assert_close(ours, expected)
    assert ours[5] == 0.0 and ours[:3].sum() != 0.0


def test_the_defaults_the_readme_says_differ_from_trls_do():
    """README, "What differs from TRL 1.16": "`disable_dropout` defaults to `True` (TRL: `False` ...), `bf16` to
    `False` (TRL: `True`) ...": each pair read out of that sentence, ours from GRPOConfig, TRL's from its GRPOConfig
    after its __post_init__ (bf16 is None there until then)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    stated = re.findall(r"`(\w+)` (?:defaults )?to `(\w+)`\s+\(TRL: `(\w+)`", readme)
    assert [name for name, _, _ in stated] == ["disable_dropout", "bf16", "gradient_checkpointing"]
    theirs = trl().GRPOConfig(output_dir="unused", use_cpu=True)  # use_cpu: TRL's bf16 default needs it here
    for name, ours_stated, theirs_stated in stated:
        assert str(getattr(grpo.GRPOConfig(), name)) == ours_stated and str(getattr(theirs, name)) == theirs_stated


def test_the_recipes_knobs_have_trls_defaults():
    ours, theirs = grpo.GRPOConfig.__dataclass_fields__, trl().GRPOConfig.__dataclass_fields__
    names = [*RECIPE_KNOBS, *ENTROPY_KNOBS, "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps",
             "shuffle_dataset", "generation_batch_size", "model_init_kwargs", "trust_remote_code"]
    assert {name: ours[name].default for name in names} == {name: theirs[name].default for name in names}
    assert set(grpo.LOSS_TYPES) == {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"}


# -- the moving reference and the generation-batch and model knobs, on the tiny model ----------------------------


def test_sync_ref_model_mixes_as_trls_callback_and_with_the_entropy_bonus_resumes_exactly(tmp_path, tiny_model_dir):
    """ref_model_sync_steps = 2: after step 2 the reference is α·θ_2 + (1 - α)·θ_0, as TRL's SyncRefModelCallback
    mixes it. With the adaptive entropy bonus on too (the tiny model's entropy, about 4, is below the target 5, so
    c rises each step), a run saved at step 2 and resumed to 4 ends with the straight run's policy, reference and
    logged rows."""
    from test_trainer import letters_data, params, read_metrics, small_args

    def run(out, **kw):
        args = small_args(tmp_path, output_dir=str(tmp_path / out), beta=0.1, sync_ref_model=True,
                          ref_model_sync_steps=2, ref_model_mixup_alpha=0.6, entropy_coef=0.01,
                          use_adaptive_entropy=True, entropy_target=5.0, entropy_coef_delta=0.01, **kw)
        return grpo.GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())

    trainer = run("two", max_steps=2)
    start = grpo.copy.deepcopy(trainer.ref_model)
    trainer.train()
    expected = grpo.copy.deepcopy(start)
    trl().SyncRefModelCallback._sync_target_model(trainer.model, expected, 0.6)
    assert torch.equal(params(trainer.ref_model), params(expected)) and not torch.equal(params(start), params(expected))
    straight = run("straight", max_steps=4)
    straight.train()
    stopped = run("resumed", max_steps=4, save_steps=2)
    stopped.train(stop_after=2)
    resumed = run("resumed", max_steps=4, resume_from_checkpoint="latest")
    resumed.train()
    for model in ("model", "ref_model"):
        assert torch.equal(params(getattr(resumed, model)), params(getattr(straight, model))), model
    rows = [{k: v for k, v in row.items() if k != "step_time"} for row in read_metrics(straight.args)]
    assert [row["entropy_coef"] for row in rows] == pytest.approx([0.02, 0.03, 0.04, 0.05])
    assert all(math.isfinite(row["policy_loss"]) for row in rows)
    assert [{k: v for k, v in row.items() if k != "step_time"} for row in read_metrics(resumed.args)] == rows
    for refused in (dict(beta=0.0), dict(use_peft=True)):
        with pytest.raises(ValueError, match="sync_ref_model moves the reference model"):
            grpo.GRPOTrainer(tiny_model_dir, "letters", train_dataset=letters_data(),
                             args=small_args(tmp_path, **{"beta": 0.1, "sync_ref_model": True, **refused}))


def test_generation_batch_size_sets_s_as_trl_counts_it(monkeypatch):
    """TRL: generation_batch_size = N·W·S over every process, the other way to set S."""
    config = functools.partial(grpo.GRPOConfig, per_device_train_batch_size=4, num_generations=4)
    assert config(generation_batch_size=12).steps_per_generation == 3
    assert config(steps_per_generation=3).generation_batch_size == 12
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: 16 = 4 × 2 × S
    assert config(generation_batch_size=16).steps_per_generation == 2
    for bad in (dict(generation_batch_size=12), dict(generation_batch_size=16, steps_per_generation=2)):
        with pytest.raises(ValueError, match=r"generation_batch_size \(1\d\) is N·W·S"):
            config(**bad)


def test_shuffle_dataset_false_keeps_the_datasets_order(tmp_path, tiny_model_dir):
    from test_trainer import letters_data, small_args

    args = small_args(tmp_path, shuffle_dataset=False)  # B = 2 prompts × G = 4 per generation batch
    batches = grpo.GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data()).prompt_batches()
    assert [row["prompt"] for row in next(batches)] == ["a="] * 4 + ["b="] * 4
    assert [row["prompt"] for row in next(batches)] == ["c="] * 4 + ["d="] * 4


def test_model_init_kwargs_and_trust_remote_code_reach_from_pretrained(tmp_path, tiny_model_dir, monkeypatch):
    """As TRL: the policy gets --dtype, trust_remote_code and then model_init_kwargs (whose dtype wins); a reward model
    trust_remote_code and model_init_kwargs; the tokenizers of both trust_remote_code."""
    from test_trainer import letters_data, small_args

    seen, load = [], grpo._from_pretrained
    monkeypatch.setattr(grpo, "_from_pretrained",
                        lambda cls, *a, **k: seen.append((cls.__name__, k)) or load(cls, *a, **k))
    args = small_args(tmp_path, trust_remote_code=True, model_init_kwargs='{"attn_implementation": "eager"}')
    trainer = grpo.GRPOTrainer(tiny_model_dir, ["letters", tiny_model_dir], args=args, train_dataset=letters_data())
    assert trainer.model.config._attn_implementation == "eager"
    policy = {"dtype": "float32", "trust_remote_code": True, "attn_implementation": "eager"}
    assert ("AutoModelForCausalLM", policy) in seen
    reward = {"num_labels": 1, "trust_remote_code": True, "attn_implementation": "eager"}
    assert ("AutoModelForSequenceClassification", reward) in seen
    assert seen.count(("AutoTokenizer", {"trust_remote_code": True})) == 2  # the policy's and the reward model's


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_the_entropy_bonus_and_its_adaptive_coefficient_are_trls(loss_type, adaptive):
    """Three optimizer steps of GA = 2 micro-batches, the entropies low, high, then low against entropy_target 0.2:
    each micro-step's loss and the gradients of the log-probs and the entropies equal TRL's, and so do policy_loss
    and the coefficient after each step (adaptive: it applies only once a step's entropy was at or below target)."""
    b, GA = batch(2), 2
    bonus = dict(entropy_coef=0.05, use_adaptive_entropy=adaptive, entropy_coef_delta=0.02, entropy_target=0.2)
    ours = grpo.Recipes(grpo.GRPOConfig(loss_type=loss_type, gradient_accumulation_steps=GA, **bonus))
    stub = trl_stub(None, None, loss_type, GA=GA, bonus=bonus)
    coefficients = []
    for step, level in enumerate([0.1, 0.4, 0.1]):
        for micro in range(GA):
            entropies = torch.rand(N, C, generator=torch.Generator().manual_seed(10 * step + micro)) * 2 * level
            runs = []
            for side in ("ours", "trl"):
                logps, ent = b["logps"].clone().requires_grad_(True), entropies.clone().requires_grad_(True)
                if side == "trl":
                    stub._get_per_token_logps_and_entropies = lambda *a, **k: (logps, ent, None)
                    stub.accelerator.sync_gradients = micro == GA - 1
                    loss = trl().GRPOTrainer._compute_loss(stub, None, trl_inputs(b))
                else:
                    loss, metrics = grpo.grpo_loss(logps, b["old"], None, b["advantages"], b["mask"],
                                                   loss_type=loss_type, gradient_accumulation_steps=GA,
                                                   epsilon_high=0.28,
                                                   max_completion_length=C, num_items_in_batch=float(b["mask"].sum()))
                    loss = ours.entropy_bonus(loss, ent, b["mask"], metrics)
                loss.backward()
                runs.append((loss.item(), logps.grad, ent.grad))
            assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6, abs=1e-8)
            torch.testing.assert_close(runs[0][1], runs[1][1])
            torch.testing.assert_close(runs[0][2], runs[1][2])
            assert metrics["policy_loss"].item() == pytest.approx(stub._metrics["train"]["policy_loss"][-1], rel=1e-6)
        coefficients.append(ours.after_step(lambda x: x)["entropy_coef"].item())
    assert coefficients == pytest.approx(stub._metrics["train"]["entropy_coef"])
    assert coefficients == pytest.approx([0.07, 0.05, 0.07] if adaptive else [0.05] * 3)


def test_cast_lm_head_to_fp32_computes_the_logits_in_float32(tmp_path, tiny_model_dir):
    """A bf16 policy with the tied head cast as TRL casts it: the head's weight is float32, the embedding still gives
    bf16 activations, and the log-probs equal those of the bf16 network's last hidden states times the float32
    weight, while the bf16 head rounds them differently."""
    from test_trainer import letters_data, small_args

    args = small_args(tmp_path, dtype="bfloat16", cast_lm_head_to_fp32=True, beta=0.1)
    trainer = grpo.GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
    for model in (trainer.model, trainer.ref_model):
        assert model.lm_head.weight.dtype == torch.float32
        assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert trainer.model.model.embed_tokens(ids).dtype == torch.bfloat16
        hidden = trainer.model.model(input_ids=ids).last_hidden_state
        logits = trainer.model(input_ids=ids).logits
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, hidden.float() @ trainer.model.lm_head.weight.T, rtol=0, atol=0)
        assert not torch.equal(logits, (hidden @ trainer.model.lm_head.weight.T.bfloat16()).float())
    trainer.train()  # and it trains: its steps are finite
    assert trainer.checkpoints.bad_steps == 0


def test_num_generations_eval_samples_that_many_per_held_out_prompt(tmp_path, tiny_model_dir):
    from test_trainer import letters_data, small_args

    args = small_args(tmp_path, num_generations_eval=2, eval_strategy="steps", eval_steps=1, max_steps=1)
    trainer = grpo.GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data(),
                               eval_dataset=letters_data(8))
    seen, generate_and_score = [], trainer.generate_and_score
    trainer.generate_and_score = lambda rows, mode="train": (seen.append((mode, len(rows)))
                                                             or generate_and_score(rows, mode))
    trainer.train()
    assert seen == [("train", 8), ("eval", 8), ("eval", 8)]  # B·G = 8 rows at once: 4 prompts × 2, twice


def loss_table() -> dict[str, tuple[str, str]]:
    """shapes.md's table of the eight loss types: {loss_type: (L, loss)}, each cell a Python expression."""
    text = (grpo.os.path.join(grpo.os.path.dirname(grpo.__file__), "shapes.md"))
    rows = re.findall(r"^\| `(\w+)`[^|]*\| `([^`]+)` \| `([^`]+)` \|$", open(text).read(), re.M)
    return {name: (per_token, total) for name, per_token, total in rows}


@pytest.mark.parametrize("loss_type", list(grpo.LOSS_TYPES))
def test_shapes_md_formula_of_each_loss_type_is_the_code(loss_type):
    """Each loss type's two formulas in shapes.md, evaluated on a small off-policy micro-batch (2 ranks, S = 2,
    GA = 1), give grpo_loss's value and gradient."""
    per_token, total = loss_table()[loss_type]
    b, recipe = batch(3), grpo.RecipeConfig()  # each recipe knob's default
    A, m = b["advantages"][:, None], b["mask"].float()
    T, W, S, GA = float(m.sum() * 2 * 2), 2, 2, 1  # the generation batch: 2 micro-batches on each of 2 ranks
    values = []
    for formula in (True, False):
        logp = b["logps"].clone().requires_grad_(True)
        if formula:
            r = torch.exp(logp - b["old"])
            w = torch.exp(((logp - b["old"]) * m).sum(1, keepdim=True))
            k = torch.where(A >= 0, recipe.vespo_k_pos, recipe.vespo_k_neg)
            lam = torch.where(A >= 0, recipe.vespo_lambda_pos, recipe.vespo_lambda_neg)
            env = dict(r=r, A=A, m=m, logp=logp, w=w, T=T, W=W, S=S, GA=GA, N=N, max_completion_length=C,
                       eps_low=0.2, eps_high=0.28, min=lambda x, y: torch.minimum(x, torch.as_tensor(y)),
                       clip=torch.clamp, sg=torch.Tensor.detach, sigmoid=torch.sigmoid,
                       tau=torch.where(A > 0, recipe.sapo_temperature_pos, recipe.sapo_temperature_neg),
                       phi=lambda w: torch.exp(lam) * w ** k * torch.exp(-lam * w))
            env["L"] = eval(per_token, {}, env)
            loss = eval(total, {}, env)
        else:
            loss, _ = grpo.grpo_loss(logp, b["old"], None, b["advantages"], b["mask"], loss_type=loss_type,
                                     epsilon_high=0.28, max_completion_length=C, gradient_accumulation_steps=GA,
                                     steps_per_generation=S, num_items_in_batch=T, world_size=W,
                                     recipes=grpo.Recipes(recipe))
        loss.backward()
        values.append((loss.item(), logp.grad))
    assert values[0][0] == pytest.approx(values[1][0], rel=1e-6)
    torch.testing.assert_close(values[0][1], values[1][1])
    assert set(loss_table()) == set(grpo.LOSS_TYPES)


def test_trls_refusals_and_advice_for_the_recipes(tmp_path, tiny_model_dir, capsys):
    """VESPO folds vLLM's correction into its weight token by token, so a sequence-level correction is refused, as TRL
    refuses it; TRL's advice on importance_sampling_level, and a CISPO cap below the on-policy ratio, are warned."""
    from test_trainer import letters_data, small_args

    with pytest.raises(ValueError, match="loss_type='vespo' with vllm_importance_sampling_mode='sequence_mask'"):
        grpo.GRPOConfig(use_vllm=True, loss_type="vespo")
    assert grpo.GRPOConfig(use_vllm=True, loss_type="vespo", vllm_importance_sampling_mode="token_mask")
    for knobs, said in ((dict(loss_type="luspo"), "LUSPO's paper uses 'sequence'"),
                        (dict(loss_type="dapo", importance_sampling_level="sequence"), "GSPO's is loss_type='grpo'"),
                        (dict(loss_type="cispo"), "CISPO caps each token's weight at epsilon_high = 0.2")):
        grpo.GRPOTrainer(tiny_model_dir, "letters", args=small_args(tmp_path, **knobs), train_dataset=letters_data())
        assert said in capsys.readouterr().out


def test_prepacked_weights_leave_the_float32_head_alone(model):
    """On a CPU, sampling may run with prepacked weights (section 14), which replace each nn.Linear's forward for
    the while: the head that cast_lm_head_to_fp32 made keeps its own, within and after, and its logits stay float32."""
    model = model.to(torch.bfloat16)
    grpo.cast_lm_head_to_fp32(model)
    head_forward, ids = model.lm_head.forward, torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with grpo.prepacked_linears(model, 4):
            assert "forward" in vars(model.model.layers[0].mlp.up_proj)  # the other layers are prepacked
            packed = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert model.lm_head.forward is head_forward and packed.dtype == after.dtype == torch.float32
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    torch.testing.assert_close(packed, expected, rtol=0, atol=0.1)  # the layers' bf16 products may round otherwise
