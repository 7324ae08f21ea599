"""Train a few GRPO steps on fixed completions and save what happened, for tests/test_distributed.py.

    python tests/distributed_run.py OUT MODEL_DIR                                  # one process, N = 8
    torchrun --standalone --nproc_per_node=2 tests/distributed_run.py OUT MODEL_DIR    # two ranks, N = 4 each

Both runs have the same global batch: 8 completions per micro-batch over all ranks, S = 2, G = 4, so one
generation batch holds 4 prompts × 4 completions, and μ = 2 passes make two optimizer steps per generation
batch (the second with ratios ≠ 1). Sampling is replaced by completions that depend only on the prompt and
the row's place in its group, so that both runs train on the same tokens. The optimizer is SGD without
clipping, so that the parameters move by the gradient itself. Each rank writes OUT/{config}-rank{r}.pt
with its prompts, advantages, logged losses and final parameters.
"""

import dataclasses
import os
import sys
import zlib

import torch
from datasets import Dataset
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402

GLOBAL_N = 8
CONFIGS = {
    "grpo": dict(loss_type="grpo"),
    # bnpo divides by the tokens of each rank's own micro-batch (as TRL does), so two ranks × N equals one
    # process × 2N only when the ranks' micro-batches hold as many tokens: here every completion is full length.
    "bnpo": dict(loss_type="bnpo", full_length=True),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo"),
    # dapo with S ≠ GA (= 2), both ways: two generation batches per optimizer step, and half of one.
    "dapo_S1": dict(loss_type="dapo", steps_per_generation=1),
    # With S = 4 > GA a step trains on each rank's first 2 micro-batches, which are other rows than one process's
    # first 2 (TRL splits the same way). With one prompt for every row, every group is the same, so each step
    # still sees the same rows as one process, and the two runs must agree, if the rows are cut in their order:
    # after a random shuffle (TRL's, and ours by default) a step takes other rows on 2 ranks than on one process.
    "dapo_S4": dict(loss_type="dapo", steps_per_generation=4, one_prompt=True, unshuffled=True),
    "batch_std": dict(loss_type="dapo", scale_rewards="batch"),
    "kl_chunked": dict(loss_type="dapo", beta=0.04, logits_chunk_size=5),
    "checkpointing": dict(loss_type="dapo", gradient_checkpointing=True),
    # TRL's other losses (section 11), and recipes that meet the ranks: normalize_then_sum normalises over every
    # rank's rows, sync_ref_model mixes the reference's weights (or shards), and the entropy bonus (its adaptive
    # coefficient raised after each step, by a target above every entropy) is a mean over each micro-batch's
    # tokens, as bnpo's: full-length completions, for the reason given there.
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo"),
    "sapo_recipes": dict(loss_type="sapo", multi_objective_aggregation="normalize_then_sum", entropy_coef=0.01,
                         use_adaptive_entropy=True, entropy_target=10.0, beta=0.04, sync_ref_model=True,
                         ref_model_sync_steps=2, ref_model_mixup_alpha=0.5, full_length=True),
}


def fixed_generate(trainer: grpo.GRPOTrainer, full_length: bool):
    """A stand-in for trainer.generate: the completion of row i is drawn from a generator seeded by the prompt
    and i mod G (its place in the group), so it does not depend on which rank or batch the row lands in."""
    tokenizer, C, G = trainer.tokenizer, trainer.args.max_completion_length, trainer.G
    eos = tokenizer.eos_token_id

    def generate(prompts):
        texts = [grpo.prompt_to_text(p, tokenizer) for p in prompts]
        prompt_ids, prompt_mask = grpo.tokenize_prompts(texts, tokenizer, trainer.args.max_prompt_length)
        completion_ids = torch.full((len(texts), C), eos)
        for i, text in enumerate(texts):
            g = torch.Generator().manual_seed(zlib.crc32(f"{text}|{i % G}".encode()))
            length = C if full_length else int(torch.randint(1, C + 1, (1,), generator=g))
            completion_ids[i, :length] = torch.randint(2, len(tokenizer), (length,), generator=g)
            if length < C:
                completion_ids[i, length - 1] = eos
        sampling_logps = torch.zeros(completion_ids.shape)  # not drawn from the model: no log-probs to keep
        return (prompt_ids.to(trainer.device), prompt_mask.to(trainer.device), completion_ids.to(trainer.device),
                sampling_logps.to(trainer.device))

    return generate


def token_sum_reward(completion_ids, **kwargs) -> list[float]:
    """A reward that differs between random completions, so that every group carries a learning signal."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def run(name: str, out_dir: str, model_dir: str) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = os.environ.get("GRPO_TEST_FSDP") == "1" and world_size > 1
    config = dict(CONFIGS[name])
    one_prompt, unshuffled = config.pop("one_prompt", False), config.pop("unshuffled", False)
    full_length = config.pop("full_length", False)
    args = grpo.GRPOConfig(
        output_dir=os.path.join(out_dir, f"{name}-w{world_size}"), num_generations=4,
        per_device_train_batch_size=GLOBAL_N // world_size, gradient_accumulation_steps=2, num_iterations=2,
        max_completion_length=6, max_grad_norm=1e9, max_steps=4, logging_steps=1, save_steps=0, fsdp=fsdp,
        **config)
    letters = "abcdefgh"
    dataset = Dataset.from_dict({"prompt": ["ab="] * 32 if one_prompt else
                                 [f"{x}{y}=" for x in letters for y in letters][:32]})
    # Plain SGD and no clipping, so that the parameters show the gradient itself: Adam and clipping would
    # hide a gradient off by a constant factor (a normalisation bug) by rescaling it away.
    torch.manual_seed(0)
    model = grpo.AutoModelForCausalLM.from_pretrained(model_dir)
    whole_weights = list(model.parameters())  # what an optimizer built before the trainer would hold
    trainer = grpo.GRPOTrainer(model=model, reward_funcs=[grpo.letters_reward, token_sum_reward], args=args,
                               train_dataset=dataset, reward_weights=[1.0, 0.5],
                               processing_class=grpo.AutoTokenizer.from_pretrained(model_dir))
    # SGD on the model's weights as the trainer holds them: under --fsdp, the shards
    trainer.optimizer, trainer.scheduler = grpo.make_optimizer(trainer.model, args, trainer.max_steps,
                                                               torch.optim.SGD(trainer.model.parameters(), lr=0.5))
    trainer.generate = fixed_generate(trainer, full_length)
    seen = {"prompts": [], "advantages": [], "allreduce_calls": 0, "refused": ""}
    if fsdp:  # --fsdp replaced them by their shards: an optimizer on them would step nothing the model uses
        try:
            grpo.make_optimizer(trainer.model, args, 4, torch.optim.SGD(whole_weights, lr=0.5))
        except ValueError as e:
            seen["refused"] = str(e)
    if trainer.world_size > 1 and not fsdp:  # count DDP's gradient all-reduces (one per bucket per backward that syncs)
        def counting_allreduce(process_group, bucket):
            seen["allreduce_calls"] += 1
            return allreduce_hook(process_group, bucket)

        trainer.model.register_comm_hook(None, counting_allreduce)
    generate_and_score = trainer.generate_and_score

    def recording(rows, mode="train"):
        batch = generate_and_score(rows, mode)
        seen["prompts"].append([row["prompt"] for row in rows])
        seen["advantages"].append(batch.advantages.cpu())
        return batch

    trainer.generate_and_score = recording
    shuffled_split = grpo.GenerationBatch.shuffled_split
    if unshuffled:  # the rows cut in their order (see CONFIGS)
        grpo.GenerationBatch.shuffled_split = lambda batch, S: [
            dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[rows] for f in dataclasses.fields(batch)
                                          if isinstance(getattr(batch, f.name), torch.Tensor)})
            for rows in torch.arange(len(batch.advantages)).chunk(S)]
    try:
        history = trainer.train()
    finally:
        grpo.GenerationBatch.shuffled_split = shuffled_split
    params = torch.cat([grpo.full_tensor(p).flatten().cpu() for p in grpo.unwrap(trainer.model).parameters()])
    stream = list(grpo.policy_weights(trainer.model))  # what vLLM's engine receives, one weight at a time
    torch.save({**seen, "loss": [row["loss"] for row in history], "reward": [row.get("reward") for row in history],
                "entropy_coef": [row.get("entropy_coef") for row in history],
                "params": params, "stream_names": [name for name, _ in stream],
                "stream": torch.cat([t.flatten().cpu() for _, t in stream])},
               os.path.join(out_dir, f"{name}-rank{trainer.rank}.pt"))


if __name__ == "__main__":
    out_dir, model_dir = sys.argv[1], sys.argv[2]
    try:
        for name in CONFIGS:
            run(name, out_dir, model_dir)
    finally:
        grpo.shutdown_distributed()
