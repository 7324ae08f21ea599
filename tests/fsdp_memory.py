"""What one rank holds for one optimizer step of AdamW, under DDP or under --fsdp, for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node=2 tests/fsdp_memory.py OUT MODEL_DIR [--fsdp [--efficient]]

Counts the bytes of the tensors themselves (a sharded weight counts only this rank's shard), not the process's
memory: the weights, their gradients just before the step, AdamW's moments just after it, and the most weight
bytes that a forward sees while sampling (with --fsdp the whole model is gathered then, beside the shards).
With --efficient (fsdp_config's cpu_ram_efficient_loading), also whether this rank read the weights from disk.
β = 0.04, so that the reference model is loaded and sharded too. Writes OUT/{ddp|fsdp|efficient}-rank{r}.json,
with a hash of the whole weights after the step.
"""

import hashlib

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


def measure(out_dir: str, model_dir: str, fsdp: bool, efficient: bool) -> None:
    args = grpo.GRPOConfig(output_dir=os.path.join(out_dir, "run"), num_generations=4, per_device_train_batch_size=8,
                           max_completion_length=6, max_steps=1, save_steps=0, logging_steps=1, beta=0.04, fsdp=fsdp,
                           fsdp_config={"cpu_ram_efficient_loading": efficient})
    loaded, from_pretrained = [], grpo._from_pretrained
    grpo._from_pretrained = lambda cls, *a, **k: loaded.append(cls.__name__) or from_pretrained(cls, *a, **k)
    trainer = grpo.GRPOTrainer(model=model_dir, reward_funcs=grpo.letters_reward, args=args,
                               train_dataset=Dataset.from_dict({"prompt": ["ab=", "cd=", "ef=", "gh="] * 4}))
    model, optimizer = trainer.model, trainer.optimizer
    seen = {"sampling_weights": 0, "read_weights": "AutoModelForCausalLM" in loaded}
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
    seen["weights_hash"] = hashlib.sha256(b"".join(grpo.full_tensor(p).numpy().tobytes() for p in params)).hexdigest()
    mode = "efficient" if efficient else "fsdp" if fsdp else "ddp"
    with open(os.path.join(out_dir, f"{mode}-rank{trainer.rank}.json"), "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    try:
        measure(sys.argv[1], sys.argv[2], fsdp="--fsdp" in sys.argv, efficient="--efficient" in sys.argv)
    finally:
        grpo.shutdown_distributed()
