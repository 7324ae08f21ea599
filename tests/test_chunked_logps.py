"""Chunked log-probs: the same values and the same gradients as the plain computation."""

import pytest
import torch

from grpo import get_per_token_logps, hidden_state_logps


def logps_and_grads(model, chunk_size, dtype):
    torch.manual_seed(3)
    prompt_ids = torch.randint(2, 50, (3, 5))
    prompt_mask = torch.tensor([[0, 1, 1, 1, 1], [1] * 5, [0, 0, 0, 1, 1]])
    completion_ids = torch.randint(0, 50, (3, 7))
    completion_mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [1] * 5 + [0, 0]])
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        batch = (prompt_ids, prompt_mask, completion_ids, completion_mask, 0.9)
        logps, entropy = (hidden_state_logps(model, *batch, with_entropy=True, pack=False, chunk_size=chunk_size)
                          if chunk_size else get_per_token_logps(model, *batch, with_entropy=True))
    (logps.float() * completion_mask).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logps.float().detach(), entropy.float(), grads


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1000])  # 21 = N × C; 5 does not divide it
def test_chunked_equals_plain_values_and_gradients(model, chunk_size, dtype, tol):
    plain_logps, plain_entropy, plain_grads = logps_and_grads(model, 0, dtype)
    logps, entropy, grads = logps_and_grads(model, chunk_size, dtype)
    torch.testing.assert_close(logps, plain_logps, atol=tol, rtol=0)
    torch.testing.assert_close(entropy, plain_entropy, atol=tol * 10, rtol=0)
    scale = plain_grads.abs().max()
    torch.testing.assert_close(grads / scale, plain_grads / scale, atol=tol * 5, rtol=0)


def test_training_with_chunks_matches_training_without(tmp_path, tiny_model_dir):
    """Same seed, with and without chunks: same losses, KL and parameters. SGD, not Adam: Adam divides by
    the running gradient scale, so a parameter with a near-zero gradient moves by up to the learning rate on
    float rounding alone, and the comparison would measure that instead of the gradients."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from grpo import GRPOConfig, GRPOTrainer

    results = []
    for chunk_size in (0, 7):
        args = GRPOConfig(output_dir=str(tmp_path / str(chunk_size)), num_generations=4, per_device_train_batch_size=8,
                          max_completion_length=6, learning_rate=1e-2, max_steps=2, logging_steps=1, save_steps=0,
                          beta=0.1, num_iterations=2, logits_chunk_size=chunk_size)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        trainer = GRPOTrainer(model, "letters", args=args, optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None),
                              train_dataset=Dataset.from_dict({"prompt": ["a=", "b=", "cd="] * 4}))
        trainer.train()
        results.append((torch.cat([p.detach().flatten() for p in trainer.model.parameters()]), trainer.history))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    for row0, row1 in zip(results[0][1], results[1][1]):
        assert row0["loss"] == pytest.approx(row1["loss"], abs=1e-6)
        assert row0["kl"] == pytest.approx(row1["kl"], abs=1e-6)
