"""Part II's faster paths (section 14): each computes what Part I computes, and each is chosen only where it pays
and where a check at setup shows it holds on that model and machine. These tests pin the packed layout, that
packed and chunked log-probs equal Part I's (log-probs, entropies, gradients), that model families whose LM head
is followed by a transform (Granite, Cohere, Gemma 2) and a planted fault get the plain path, and both branches
of every capability check, forced either way so that each runs on every kind of CPU."""

import functools

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

import grpo
from grpo import GRPOConfig, GRPOTrainer, get_per_token_logps, hidden_state_logps, pack_rows, shared_prompts


def test_equal_prompts_are_found_wherever_they_are():
    ids = torch.tensor([[0, 7], [5, 6], [0, 7], [5, 6], [5, 6], [3, 3]])
    mask = torch.tensor([[0, 1], [1, 1], [0, 1], [1, 1], [1, 1], [1, 1]])
    first, group = shared_prompts(ids, mask)
    assert [first[g].item() for g in group] == [0, 1, 0, 1, 1, 5]  # each row's prompt, by its first row
    mask[2, 0] = 1  # the same ids under another mask are another prompt
    first, group = shared_prompts(ids, mask)
    assert len(first) == 4 and group[0] != group[2]
    assert shared_prompts(ids[[0, 1, 5]], mask[[0, 1, 5]]) is None  # no two rows share a prompt


def hand_batch():
    """Rows 0 and 1 share the left-padded prompt [7, 8]; row 2 has [5, 6, 4]. P = C = 3."""
    prompt_ids = torch.tensor([[0, 7, 8], [0, 7, 8], [5, 6, 4]])
    prompt_mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1]])
    completion_ids = torch.tensor([[11, 12, 13], [21, 22, 99], [31, 99, 99]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_packed_layout_by_hand():
    packed = pack_rows(*hand_batch(), max_length=100)
    assert packed.input_ids.tolist() == [[7, 8, 11, 12, 13, 21, 22, 5, 6, 4, 31]]
    # Row 1's completion starts again at position 2, right after its prompt, as in its own padded row.
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 3]]
    # Token 11 is predicted by its prompt's last token (column 1), 12 by 11, 13 by 12; 21 by the prompt's last
    # again, 22 by 21 (column 5); 31 by the last token of its own prompt (column 9).
    assert packed.predictors.tolist() == [1, 2, 3, 1, 5, 9]
    allowed = packed.allowed[0].int().tolist()
    assert allowed[4] == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # 13 sees its prompt and its own completion
    assert allowed[6] == [1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0]  # 22 sees its prompt and 21, not row 0's tokens
    assert allowed[1] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # a prompt is causal
    assert allowed[7] == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]  # and sees only itself
    assert allowed[10] == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_a_shuffled_micro_batch_still_packs_each_prompt_once():
    """The generation batch is shuffled before it is cut (as TRL does), so a group's rows are scattered: rows
    0 and 2 share a prompt here. They are laid out together, and the predictors stay in row order."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = (x[[0, 2, 1]] for x in hand_batch())
    packed = pack_rows(prompt_ids, prompt_mask, completion_ids, completion_mask, max_length=100)
    assert packed.input_ids.tolist() == [[7, 8, 11, 12, 13, 21, 22, 5, 6, 4, 31]]
    assert packed.predictors.tolist() == [1, 2, 3, 9, 1, 5]  # row 0's three tokens, row 1's one, row 2's two


def test_packed_rows_are_cut_at_max_length():
    # Row 2 and its prompt (4 tokens) would make 11 > 7: they start a second packed row, padded with 0.
    packed = pack_rows(*hand_batch(), max_length=7)
    assert packed.input_ids.tolist() == [[7, 8, 11, 12, 13, 21, 22], [5, 6, 4, 31, 0, 0, 0]]
    assert packed.predictors.tolist() == [1, 2, 3, 1, 5, 7 + 2]  # flattened (R·L): row 1, column 2
    assert packed.allowed[1, 5].int().tolist() == [0, 0, 0, 0, 1, 1, 0]  # padding sees only padding
    # A group cut in the middle repeats its prompt in the next packed row.
    prompt_ids, prompt_mask = torch.tensor([[0, 7, 8]] * 3), torch.tensor([[0, 1, 1]] * 3)
    completion_ids = torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33]])
    packed = pack_rows(prompt_ids, prompt_mask, completion_ids, torch.ones(3, 3, dtype=torch.long), max_length=8)
    assert packed.input_ids.tolist() == [[7, 8, 11, 12, 13, 21, 22, 23], [7, 8, 31, 32, 33, 0, 0, 0]]


def grouped_batch(shuffle=False):
    """Two prompts (the first left-padded), the first repeated 3 times and the second twice, with completions of
    different lengths; shuffled, the rows of a prompt are not adjacent."""
    torch.manual_seed(3)
    prompts = torch.randint(2, 50, (2, 5))
    prompt_ids = prompts[[0, 0, 0, 1, 1]]
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1]] * 3 + [[1] * 5] * 2)
    completion_ids = torch.randint(0, 50, (5, 6))
    completion_mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0], [1] * 4 + [0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]])
    order = [3, 0, 4, 2, 1] if shuffle else list(range(5))
    return tuple(x[order] for x in (prompt_ids, prompt_mask, completion_ids, completion_mask))


def logps_and_grads(model, fast, entropy_grad=False, **kw):
    """The log-probs, entropies and the gradient of their sum (the entropies' too with entropy_grad, as the entropy
    bonus takes them)."""
    batch = grouped_batch(kw.pop("shuffle", False))
    completion_mask = batch[3]
    model.zero_grad()
    with_entropy = "grad" if entropy_grad else True
    logps, entropy = (hidden_state_logps(model, *batch, 0.9, with_entropy=with_entropy, **kw) if fast else
                      get_per_token_logps(model, *batch, 0.9, with_entropy=with_entropy))
    assert entropy.requires_grad == entropy_grad
    ((logps + entropy * entropy_grad) * completion_mask).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logps.detach() * completion_mask, entropy * completion_mask, grads


def count_forward_rows(model):
    """The shape of the input ids of every forward call of the model, in order."""
    rows = []
    model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape),
                                    with_kwargs=True)
    return rows


@pytest.mark.parametrize("entropy_grad", [False, True], ids=["", "entropy bonus"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk_size", [0, 4], ids=["plain", "chunked"])
@pytest.mark.parametrize("width,shuffle", [(64, False), (8, False), (64, True)], ids=["one row", "cut rows", "shuffled"])
def test_packed_rows_give_part_one_logps_and_gradients(model, chunk_size, attention, width, shuffle, entropy_grad):
    model.set_attn_implementation(attention)
    padded = logps_and_grads(model, fast=False, entropy_grad=entropy_grad, shuffle=shuffle)
    calls = count_forward_rows(model)
    # Packed rows are cut at max(P + C, hidden_size) tokens: the model's 64, or 11 when it claims to be 8 wide.
    model.config.hidden_size = width
    packed = logps_and_grads(model, fast=True, entropy_grad=entropy_grad, pack=True, chunk_size=chunk_size,
                             shuffle=shuffle)
    # One pass over 3 + (6 + 2 + 4) + 5 + (6 + 1) = 27 tokens, where the padded batch has 5 rows of P + C = 11.
    # Cut at 11: 3 + 6 + 2 = 11 and 3 + 4 = 7 for the first prompt, 5 + 6 = 11 and 5 + 1 = 6 for the second.
    assert calls == ([(1, 27)] if width == 64 else [(4, 11)])
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-5, rtol=0)
    assert padded[2].abs().max() > 1e-3  # the gradients compared are not all zero


def test_packed_rows_under_activation_checkpointing(model):
    padded = logps_and_grads(model, fast=False)
    grpo.checkpoint_activations(model)
    model.train()
    calls = count_forward_rows(model)
    checkpointed = logps_and_grads(model, fast=True, pack=True)
    assert calls == [(1, 27)]
    for a, b in zip(checkpointed, padded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_the_sampling_check_compares_the_samplers_as_the_trainer_runs_them_under_checkpointing(model):
    # transformers before 5.24 drop a checkpointed layer's KV cache in training mode, so the trainer samples in eval
    # mode there. The check must compare the samplers in that mode too: before, it ran Part I's loop in training mode,
    # from a one-token context on those releases, and refused a sampler that was right.
    grpo.checkpoint_activations(model)
    model.train()
    right = functools.partial(grpo.sample_in_eval_mode, sample=grpo.sample_with_cache)
    assert grpo.sampling_problem(right, model, eval_mode=True) is None
    assert grpo.sampling_problem(grpo.sample_grouped, model, eval_mode=True) is None
    assert model.training  # the check leaves the mode it found
    # Elsewhere it compares them in the mode they sample in: training mode, where dropout (--disable_dropout False)
    # draws other masks for the grouped sampler's one pass over a group's prompt than for Part I's G passes.
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    assert grpo.sampling_problem(grpo.sample_grouped, model).startswith("samples from other distributions")


# -- the checks that choose a path ---------------------------------------------------------------------------


def tiny(config_class, attention="sdpa", **kw):
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


PACKED, CHUNKED = (lambda *a, **k: hidden_state_logps(*a, **k, pack=True),
                   lambda *a, **k: hidden_state_logps(*a, **k, pack=False, chunk_size=3))


def test_a_plain_llama_passes_both_checks():
    model = tiny(LlamaConfig)
    assert grpo.logps_problem(PACKED, model) is None and grpo.logps_problem(CHUNKED, model) is None


@pytest.mark.parametrize("family,config_class,settings,attention", [
    ("granite", GraniteConfig, dict(logits_scaling=8.0), "sdpa"),  # logits / 8 after the head
    ("cohere", CohereConfig, dict(logit_scale=0.0625), "sdpa"),  # logits × 0.0625 after the head
    ("gemma2", Gemma2Config, dict(final_logit_softcapping=30.0, query_pre_attn_scalar=8), "eager"),  # 30·tanh(l/30)
])
def test_a_transform_after_the_lm_head_gets_the_plain_path(family, config_class, settings, attention, monkeypatch):
    model = tiny(config_class, attention, **settings)
    for fast in (PACKED, CHUNKED):
        assert f"would skip the {next(iter(settings))}=" in grpo.logps_problem(fast, model), family
    # The probe on its own catches the scalings (by 0.28 and 0.14 on these random weights), but not a softcap of
    # 30 on small logits: that is why the known transforms are refused by name.
    monkeypatch.setattr(grpo, "HEAD_TRANSFORMS", ())
    problem = grpo.logps_problem(CHUNKED, model)
    if family == "gemma2":
        assert problem is None and not grpo.can_pack(model)  # packing is refused for its sliding window anyway
    else:
        assert "differ from this model's own forward by" in problem


def test_a_planted_fault_makes_the_check_choose_the_plain_path(tmp_path, tiny_model_dir, monkeypatch, capsys):
    def off_by_a_little(*args, **kwargs):
        logps, entropy = hidden_state_logps(*args, **kwargs)
        return logps + 0.01, entropy

    monkeypatch.setattr(grpo, "PACK_FROM_WIDTH", 0)  # the tiny model would take the plain path anyway
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, max_steps=1)
    data = Dataset.from_dict({"prompt": ["a=", "b="] * 4})
    assert GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=data).get_per_token_logps.func is \
        hidden_state_logps  # the real packed pass passes
    monkeypatch.setattr(grpo, "hidden_state_logps", off_by_a_little)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=data)
    assert trainer.get_per_token_logps is get_per_token_logps
    assert "plain log-probs: packed rows differ from this model's own forward by 0.01" in capsys.readouterr().out


def test_small_models_keep_part_one_paths_and_wide_ones_take_the_fast_ones(tmp_path, tiny_model_dir, monkeypatch,
                                                                          capsys):
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, max_steps=1)
    data = Dataset.from_dict({"prompt": ["a=", "b="] * 4})
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=data)
    assert trainer.sample is grpo.sample_grouped and trainer.get_per_token_logps is get_per_token_logps
    assert "[grpo] sampling each group's prompt once." in capsys.readouterr().out
    monkeypatch.setattr(grpo, "PACK_FROM_WIDTH", 64)  # as if the demo's model were wide enough to pay
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=data)
    assert trainer.get_per_token_logps.func is hidden_state_logps
    # float32 prepacking is oneDNN's, on every x86 CPU (only its bf16 path needs AVX-512): it must be taken here
    assert trainer.sample.func is grpo.sample_prepacked and trainer.sample.keywords["sample"] is grpo.sample_grouped


def test_a_cpu_whose_onednn_refuses_bf16_samples_with_plain_weights(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """On an AVX2 CPU oneDNN's bf16 prepacking raises; the trial at setup catches it, and --bf16 still trains."""
    def refuse(*args, **kwargs):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or "
                           "avx512bw, avx512vl and avx512dq")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    monkeypatch.setattr(grpo, "PACK_FROM_WIDTH", 64)
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, max_steps=1,
                      bf16=True, max_completion_length=4)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=Dataset.from_dict({"prompt": ["a="] * 4}))
    assert trainer.sample is grpo.sample_grouped
    assert "plain weights (oneDNN refused: mkldnn_reorder_linear_weight: bf16 path needs" in \
        capsys.readouterr().out
    trainer.train()
    assert trainer.global_step == 1


@pytest.mark.parametrize("native", [True, False], ids=["AMX or AVX-512-BF16", "AVX2 only"])
@pytest.mark.parametrize("setting", [dict(bf16=True), dict(dtype="bfloat16"), {}], ids=["--bf16", "--dtype bf16", "float32"])
def test_bf16_on_a_cpu_without_native_bf16_is_a_warning(tmp_path, tiny_model_dir, monkeypatch, capsys, native,
                                                        setting):
    monkeypatch.setattr(grpo, "cpu_has_native_bf16", lambda: native)
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, max_steps=1,
                      **setting)
    GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=Dataset.from_dict({"prompt": ["a="] * 8}))
    out = capsys.readouterr().out
    warned = "which has neither AMX nor AVX-512-BF16: PyTorch emulates bf16 here, and float32 is many times faster"
    assert out.count(warned) == (1 if setting and not native else 0)


def test_a_sliding_window_falls_back_to_padded_rows(model):
    assert grpo.can_pack(model)
    model.config.sliding_window = 4096  # the packed mask would not apply the window
    assert not grpo.can_pack(model)


@pytest.mark.parametrize("dtype,tol", [(None, 1e-5), (torch.bfloat16, 0.1)], ids=["float32", "bf16 autocast"])
def test_prepacked_linears_give_the_same_logits(model, dtype, tol):
    problem = grpo.prepacking_problem(model, dtype)
    if problem is not None:
        pytest.skip(f"no prepacked weights on this CPU: {problem}")
    ids = torch.randint(2, 40, (4, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        plain = model(input_ids=ids).logits
        with grpo.prepacked_linears(model, rows=4, autocast_dtype=dtype):
            assert "forward" in model.lm_head.__dict__  # the layer's own forward is replaced while inside
            packed = model(input_ids=ids).logits
    assert "forward" not in model.lm_head.__dict__  # and restored after
    assert packed.dtype == plain.dtype
    torch.testing.assert_close(packed.float(), plain.float(), atol=tol, rtol=0)


AVX2_KERNELS = dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
CHECKS_UNDER_AVX2 = """
import functools, torch, grpo
assert torch.backends.cpu.get_cpu_capability() == "AVX2" and not grpo.cpu_has_native_bf16()
assert "AVX-512-BF16" not in grpo.cpu_description() and "AMX" not in grpo.cpu_description()
tokenizer = grpo.build_char_tokenizer()
for width in (64, 256):  # the demo's model, and one wide enough for the packed passes and prepacked weights
    model = grpo.build_tiny_model(tokenizer, hidden_size=width).eval()
    for sampler in (grpo.sample_grouped, functools.partial(grpo.sample_prepacked, sample=grpo.sample_grouped)):
        assert grpo.sampling_problem(sampler, model) is None, width
    for pack, chunk in ((True, 0), (False, 8)):
        assert grpo.logps_problem(functools.partial(grpo.hidden_state_logps, pack=pack, chunk_size=chunk), model) is None
    assert grpo.prepacking_problem(model, None) is None
    # oneDNN's bf16 path needs AVX-512: refused here with its reason, which costs the run the speed-up only
    assert grpo.prepacking_problem(model, torch.bfloat16).startswith("oneDNN refused")
print("accepted")
"""


def test_the_setup_checks_accept_the_fast_paths_with_avx2_kernels(tmp_path):
    """PyTorch, oneDNN and MKL held to AVX2 (each has a variable for it), as on an AVX2-only AMD EPYC: another kind of
    CPU rounds otherwise, and each check must still accept what is right (an earlier check refused the grouped sampler there
    for drawing another token of probability 1e-6). bf16 is then reported as emulated, and its prepacking refused."""
    import os
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", CHECKS_UNDER_AVX2], env={**os.environ, **AVX2_KERNELS},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "accepted", done.stderr[-2000:]
