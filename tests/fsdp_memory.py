"""What one rank holds for one optimizer step of AdamW, under DDP or under --fsdp, for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node=2 tests/fsdp_memory.py OUT MODEL_DIR [--fsdp]

Counts the bytes of the tensors themselves (a sharded weight counts only this rank's shard), not the process's
memory: the weights, their gradients just before the step, AdamW's moments just after it, and the most weight
bytes that a forward sees while sampling (with --fsdp the whole model is gathered then, beside the shards).
Writes OUT/{ddp|fsdp}-rank{r}.json.
"""

import json
import os
import sys

import torch
from datasets import Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402


def held(tensors) -> int:
    """Bytes of these tensors on this rank: a DTensor's local shard only."""
    return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors if t is not None)


def measure(out_dir: str, model_dir: str, fsdp: bool) -> None:
    args = grpo.GRPOConfig(output_dir=os.path.join(out_dir, "run"), num_generations=4, per_device_train_batch_size=8,
                           max_completion_length=6, max_steps=1, save_steps=0, logging_steps=1, fsdp=fsdp)
    trainer = grpo.GRPOTrainer(model=model_dir, reward_funcs=grpo.letters_reward, args=args,
                               train_dataset=Dataset.from_dict({"prompt": ["ab=", "cd=", "ef=", "gh="] * 4}))
    model, optimizer, seen = trainer.model, trainer.optimizer, {"sampling_weights": 0}
    params = list(grpo.unwrap(model).parameters())

    def while_sampling(module, inputs):  # after FSDP's own pre-forward hook: the weights this forward runs on
        if not torch.is_grad_enabled():
            seen["sampling_weights"] = max(seen["sampling_weights"], held(grpo.unwrap(model).parameters()))

    grpo.unwrap(model).register_forward_pre_hook(while_sampling)  # sampling runs the unwrapped model
    step = optimizer.step

    def measured_step(*a, **k):
        seen["weights"], seen["gradients"] = held(params), held(p.grad for p in params)
        result = step(*a, **k)
        seen["optimizer_state"] = held(t for state in optimizer.state.values() for t in state.values()
                                       if isinstance(t, torch.Tensor) and t.dim() > 0)
        return result

    optimizer.step = measured_step
    trainer.train()
    seen["whole_model"] = sum(p.numel() * p.element_size() for p in params)
    seen["shards"] = held(params)
    with open(os.path.join(out_dir, f"{'fsdp' if fsdp else 'ddp'}-rank{trainer.rank}.json"), "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    try:
        measure(sys.argv[1], sys.argv[2], fsdp="--fsdp" in sys.argv)
    finally:
        grpo.shutdown_distributed()
