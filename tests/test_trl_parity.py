"""What TRL 1.16 does on the way to the loss, pinned: the seed's own configuration snippets run as written, a string
prompt gets the tokenizer's special tokens (one BOS, never two), the stop tokens are TRL's set, and the generation
batch is shuffled before it is cut into micro-batches."""

import pytest
import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import grpo
from grpo import GRPOConfig, GRPOTrainer


# -- the seed's GRPOConfig snippets, as its reader copies them ---------------------------------------------------


def test_the_full_config_trains_as_its_numbers_say(tmp_path, tiny_model_dir, capsys):
    """The typical full configuration (TRL's names) trains one generation batch of the tiny model, as written but for
    max_completion_length (8, not 128) and a bounded run: N = 8 completions per micro-batch × S = 4 is 32 completions
    of B = 8 prompts; μ = 2 passes over S = 4 micro-batches with GA = 1 are 8 optimizer steps in the one generation
    batch, so π_θ_old must be computed (an optimizer step falls between sampling and training); the linear schedule's
    8th step uses 5e-5 · 1/8; log_completions prints the batch's completions."""
    args = GRPOConfig(output_dir=str(tmp_path), max_prompt_length=512, max_completion_length=8, num_generations=4,
                      temperature=0.9, top_p=0.9, num_iterations=2, steps_per_generation=4, learning_rate=5e-5,
                      per_device_train_batch_size=8, beta=0.1, epsilon=0.2, epsilon_high=0.2, loss_type="grpo",
                      use_vllm=False, vllm_mode="colocate", log_completions=True, disable_dropout=True,
                      max_steps=8, logging_steps=8, save_steps=0)
    data = Dataset.from_dict({"prompt": [f"{a}{b}=" for a in "abcd" for b in "abcd"]})
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=data)
    assert (trainer.B, trainer.G, trainer.S, trainer.mu, trainer.needs_old_logps) == (8, 4, 4, 2, True)
    rows = trainer.train()
    assert trainer.global_step == 8 and trainer.report.generation_batches == 1
    assert [row["step"] for row in rows] == [8] and rows[0]["learning_rate"] == pytest.approx(5e-5 / 8)
    assert rows[0]["kl"] >= 0 and len(trainer.report.samples) == 32
    assert capsys.readouterr().out.count(" -> ") >= args.num_completions_to_print  # the completions, printed


def test_the_seeds_vllm_snippet_is_accepted_and_a_vllm_knob_alone_is_refused():
    """TRL's colocate snippet is a valid config (tests/test_vllm.py trains it where vLLM imports); a vLLM knob set
    without use_vllm would do nothing, so it is refused in one line."""
    args = GRPOConfig(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.9, vllm_tensor_parallel_size=1)
    assert args.vllm_gpu_memory_utilization == 0.9 and args.vllm_importance_sampling_correction
    with pytest.raises(ValueError, match=r"^vllm_gpu_memory_utilization=0.9 is a vLLM setting, and use_vllm is False"):
        GRPOConfig(vllm_gpu_memory_utilization=0.9)


def test_the_seeds_liger_snippet_selects_the_bounded_memory_log_probs():
    args = GRPOConfig(use_liger_loss=True, loss_type="grpo")
    assert args.logits_chunk_size == grpo.LIGER_CHUNK == 256 and args.loss_type == "grpo"
    assert GRPOConfig(use_liger_loss=True, logits_chunk_size=64).logits_chunk_size == 64  # a chunk given stays


def test_the_seeds_logging_snippet_sets_trls_log_unique_prompts():
    args = GRPOConfig(log_completions=True, num_completions_to_print=5, wandb_log_unique_prompts=True)
    assert args.log_unique_prompts and args.num_completions_to_print == 5
    assert not GRPOConfig(log_completions=True).log_unique_prompts


def test_log_unique_prompts_keeps_the_first_completion_of_each_prompt(tmp_path, tiny_model_dir):
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, max_steps=1,
                      max_completion_length=4, log_completions=True, log_unique_prompts=True, logging_steps=1)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=Dataset.from_dict({"prompt": ["a=", "b="] * 4}))
    trainer.train()
    assert sorted(sample["prompt"] for sample in trainer.report.samples) == ["a=", "b="]  # 2 of the 8 rows


# -- prompts: the tokenizer's special tokens, as TRL adds them ---------------------------------------------------


def llama_like_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer whose post-processor adds a BOS, as Llama's does."""
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "<unk>", *"abcdefgh=: \n"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return tokenizer


def test_a_string_prompt_gets_the_bos_a_llama_tokenizer_adds_once():
    tokenizer = llama_like_tokenizer()
    ids, mask = grpo.tokenize_prompts(["ab=", "<s>ab=", "c="], tokenizer, None)
    assert ids[0][mask[0].bool()].tolist() == [0, 3, 4, 11]  # <s> a b =, as TRL's processing_class(text=...)
    assert ids[1].tolist() == ids[0].tolist()  # a string that starts with the BOS text gets one BOS, not two
    assert ids[2][mask[2].bool()].tolist() == [0, 5, 11]
    # A chat prompt's template wrote its BOS; no second one is added (TRL: apply_chat_template(tokenize=True)).
    chat, chat_mask = grpo.tokenize_prompts([[{"role": "user", "content": "ab="}]], tokenizer, None)
    assert chat[0][chat_mask[0].bool()].tolist() == [0, 3, 4, 11, 14]


def test_the_demo_tokenizer_reloads_with_its_spaces_and_newlines(tokenizer):
    # `tokenizer` is the demo's, saved and reloaded by AutoTokenizer: from transformers 5.19 as Qwen2Tokenizer, whose
    # byte-level pre-tokenizer dropped the space and the newline of a chat prompt (3 tokens of 21 here) before
    # build_char_tokenizer spelled them as byte-level BPE does.
    text = "user: ab=\nassistant: "
    assert tokenizer(text).input_ids == grpo.build_char_tokenizer()(text).input_ids
    assert len(tokenizer(text).input_ids) == len(text) == 21
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_a_tokenizer_that_adds_nothing_is_unchanged(tokenizer):
    ids, _ = grpo.tokenize_prompts(["ab="], tokenizer, None)  # the demo's: no special tokens to add
    assert ids[0].tolist() == tokenizer("ab=", add_special_tokens=False)["input_ids"]
    # SmolLM2's case: a BOS token (<|im_start|>) that the tokenizer never adds. A string prompt that starts with
    # it (a chat template's text) keeps it: only a BOS the tokenizer adds back is taken off first.
    llama = llama_like_tokenizer()
    llama._tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    ids, mask = grpo.tokenize_prompts(["<s>ab="], llama, None)
    assert ids[0][mask[0].bool()].tolist() == [0, 3, 4, 11]


# -- where a completion ends --------------------------------------------------------------------------------------


def test_the_stop_tokens_are_the_generation_configs_and_the_tokenizers(model, tokenizer):
    tokenizer = llama_like_tokenizer()  # EOS </s> = 1
    model.generation_config.eos_token_id = [5, 6]  # a chat model's config lists several
    assert grpo.find_eos_token_ids(model, tokenizer) == [1, 5, 6]  # TRL: the tokenizer's first, if it is not listed
    model.generation_config.eos_token_id = 1
    assert grpo.find_eos_token_ids(model, tokenizer) == [1]
    model.generation_config.eos_token_id = None
    assert grpo.find_eos_token_ids(model, tokenizer) == [1]


# -- the generation batch is shuffled before it is cut -------------------------------------------------------------


def test_the_generation_batch_is_shuffled_as_trl_shuffles_it_then_cut():
    BG, C = 8, 3
    batch = grpo.GenerationBatch(torch.arange(BG)[:, None].repeat(1, 2), torch.ones(BG, 2, dtype=torch.long),
                                 torch.arange(BG * C).view(BG, C), torch.ones(BG, C, dtype=torch.long),
                                 torch.arange(BG).float(), None, None, num_items_in_batch=24.0)
    torch.manual_seed(0)
    parts = batch.shuffled_split(2)
    torch.manual_seed(0)
    order = torch.randperm(BG)  # TRL's shuffle_sequence_dict: torch.randperm(batch_size) on the global generator
    assert [p.advantages.tolist() for p in parts] == [order[:4].float().tolist(), order[4:].float().tolist()]
    for part in parts:  # every field moved with its row
        assert torch.equal(part.prompt_ids[:, 0], part.advantages.long())
        assert torch.equal(part.completion_ids[:, 0], part.advantages.long() * C)
        assert part.num_items_in_batch == 24.0 and part.old_per_token_logps is None
    assert sorted(sum((p.advantages.tolist() for p in parts), [])) == list(range(BG))  # each row exactly once


def test_micro_batches_mix_groups_and_the_trainer_still_shares_prompts(tmp_path, tiny_model_dir):
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4,
                      steps_per_generation=2, gradient_accumulation_steps=2, max_steps=1, max_completion_length=4)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=Dataset.from_dict({"prompt": ["a=", "bb="] * 4}))
    trainer.train()
    prompts = [[trainer.tokenizer.decode(row[mask.bool()]) for row, mask in zip(b.prompt_ids, b.prompt_mask)]
               for b in trainer.checkpoints.micro_batches]
    assert sorted(sum(prompts, [])) == ["a="] * 4 + ["bb="] * 4
    assert any(len(set(p)) == 2 for p in prompts)  # seed 42: a micro-batch holds rows of both groups
