"""torchrun with 2 CPU processes (gloo) computes what one process computes with twice the batch.

tests/distributed_run.py trains each configuration for 4 optimizer steps (2 generation batches, μ = 2) on
fixed completions, once as one process with 8 completions per micro-batch and once as 2 ranks with 4 each.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from distributed_run import CONFIGS  # noqa: E402

pytestmark = pytest.mark.slow  # the quick subset, -m 'not slow', leaves this module out

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(command, env_extra=None, **kwargs):
    env = {**os.environ, "GRPO_CHECK_SHAPES": "1", **(env_extra or {})}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def loss_tolerance(losses: list[float]) -> float:
    """1e-6, or 1e-6 of the loss where it is larger than 1 (LUSPO sums each completion's tokens): float32 rounds
    relative to the value, and the ranks' other order of summation may move the last bits."""
    return 1e-6 * max(1.0, *map(abs, losses))


def logged_rows(out) -> list[dict]:
    """The rows of out/metrics.jsonl without their wall-clock times, which differ between any two runs."""
    return [{k: v for k, v in json.loads(line).items() if k != "step_time"} for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Every configuration trained by one process and by two ranks: {config: (one, [rank0, rank1])}."""
    one, two = tmp_path_factory.mktemp("one-process"), tmp_path_factory.mktemp("two-ranks")
    _run([sys.executable, os.path.join(HERE, "distributed_run.py"), str(one), tiny_model_dir])
    _run([*TORCHRUN, os.path.join(HERE, "distributed_run.py"), str(two), tiny_model_dir])
    return {name: (torch.load(one / f"{name}-rank0.pt"), [torch.load(two / f"{name}-rank{r}.pt") for r in (0, 1)])
            for name in CONFIGS}


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, tiny_model_dir):
    """Every configuration trained by two ranks under --fsdp (FSDP2): {config: [rank0, rank1]}."""
    out = tmp_path_factory.mktemp("two-ranks-fsdp")
    _run([*TORCHRUN, os.path.join(HERE, "distributed_run.py"), str(out), tiny_model_dir],
         env_extra={"GRPO_TEST_FSDP": "1"})
    return {name: [torch.load(out / f"{name}-rank{r}.pt") for r in (0, 1)] for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_sharded_ranks_give_the_loss_and_parameters_of_ddp_and_of_one_process(runs, sharded_runs, name):
    one, ddp = runs[name]
    sharded = sharded_runs[name]
    assert sharded[0]["loss"] == sharded[1]["loss"] and torch.equal(sharded[0]["params"], sharded[1]["params"])
    for other in (ddp[0], one):  # on an Intel Xeon: 0 against DDP, 1.2e-7 against one process
        torch.testing.assert_close(torch.tensor(sharded[0]["loss"]), torch.tensor(other["loss"]), rtol=0,
                                   atol=loss_tolerance(other["loss"]))
        torch.testing.assert_close(sharded[0]["params"], other["params"], rtol=0, atol=1e-6)
    assert sharded[0]["allreduce_calls"] == 0  # no DDP here: the gradients were reduce-scattered instead
    assert sharded[0]["refused"].startswith("The optimizer given holds whole weights, not the shards --fsdp made")
    # the weights a vLLM engine receives under --fsdp, each gathered in turn: DDP's names, the whole weights
    assert sharded[0]["stream_names"] == ddp[0]["stream_names"] and len(sharded[0]["stream_names"]) > 20
    assert torch.equal(sharded[0]["stream"], sharded[0]["params"]) and torch.equal(ddp[0]["stream"], ddp[0]["params"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_give_the_same_advantages_loss_and_parameters_as_one_process(runs, name):
    one, ranks = runs[name]
    for k, advantages in enumerate(one["advantages"]):  # rank 0's rows, then rank 1's, are the batch's rows
        torch.testing.assert_close(torch.cat([r["advantages"][k] for r in ranks]), advantages, rtol=0, atol=1e-6)
    assert len(one["loss"]) == len(ranks[0]["loss"]) == 4
    assert ranks[0]["loss"] == ranks[1]["loss"]  # the logged loss is the mean over ranks, the same on each
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor(one["loss"]), rtol=0,
                               atol=loss_tolerance(one["loss"]))
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])  # DDP keeps the copies identical
    torch.testing.assert_close(ranks[0]["params"], one["params"], rtol=0, atol=1e-6)


def test_the_adaptive_entropy_coefficient_takes_the_same_path_on_every_layout(runs, sharded_runs):
    """sapo_recipes: c starts at 0.01 and rises by entropy_coef_delta after each step (its entropy is below the
    target): the same path under one process, DDP and --fsdp, where the tests above find the same losses."""
    one, ddp = runs["sapo_recipes"]
    assert one["entropy_coef"] == pytest.approx([0.015, 0.02, 0.025, 0.03])
    for other in (*ddp, *sharded_runs["sapo_recipes"]):
        assert other["entropy_coef"] == pytest.approx(one["entropy_coef"], abs=1e-7)


def test_the_parameters_moved_far_more_than_the_tolerance(runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    start = torch.cat([p.detach().flatten() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()])
    for name, (one, _) in runs.items():
        assert (one["params"] - start).abs().max() > 1e-2, name


def test_gradients_are_all_reduced_once_per_optimizer_step_not_per_micro_step(runs):
    # 4 optimizer steps of 2 accumulated micro-steps each: no_sync skips the all-reduce of the first.
    # (The tiny model's gradients fit in one DDP bucket.)
    for name, (_, ranks) in runs.items():
        assert [r["allreduce_calls"] for r in ranks] == [4, 4], name


def test_each_rank_gets_whole_groups_and_together_the_single_process_batch(runs):
    one, ranks = runs["dapo"]
    G = 4
    for k, prompts in enumerate(one["prompts"]):
        per_rank = [r["prompts"][k] for r in ranks]
        assert per_rank[0] + per_rank[1] == prompts  # rank 0 has the first half of the batch's rows, rank 1 the rest
        for rows in per_rank:
            groups = [rows[i:i + G] for i in range(0, len(rows), G)]
            assert all(len(set(group)) == 1 for group in groups)  # G copies of one prompt, never split
            assert len({group[0] for group in groups}) == len(groups) == 2  # B = 2 different prompts per rank


def test_torchrun_default_demo_runs_to_the_end_and_learns(tmp_path):
    """The default demo under torchrun (each of 2 ranks takes B = 8 prompts, 16 in all per step), cut to 200 of
    its 400 steps to save CI half a minute: on an Intel Xeon with AVX-512-BF16 (2 vCPU) it went from -8.36 to
    4.49 in 32 s. (Notebook 05's test holds the whole single-process run to within 0.2 of the best.)"""
    out = tmp_path / "out"
    result = _run([*TORCHRUN, "grpo.py", "--output_dir", str(out), "--max_steps", "200"])
    assert result.stdout.count("GRPO: ") == 1  # only rank 0 prints
    before, after = map(float, re.search(r"held-out prompts .*: (\S+) before training -> (\S+) after",
                                         result.stdout).groups())
    assert before < -5 and after > 3, result.stdout[-2000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [row["step"] for row in rows] == list(range(0, 201, 50))  # written once, by rank 0; 0: eval on start
    assert os.path.isfile(out / "model.safetensors")


FAILING_RUN = '''
import os, sys
sys.path.insert(0, {root!r})
import grpo
from datasets import Dataset

def answer_reward(completions, **kwargs):
    if os.environ["RANK"] == "1":
        raise KeyError("answer")
    return [0.0] * len(completions)

try:
    args = grpo.GRPOConfig(output_dir={out!r}, num_generations=4, per_device_train_batch_size=8,
                           max_completion_length=4, max_steps=3, save_steps=0)
    grpo.GRPOTrainer(model={model!r}, reward_funcs=answer_reward, args=args,
                     train_dataset=Dataset.from_dict({{"prompt": ["a=", "b="] * 8}})).train()
finally:
    grpo.shutdown_distributed()
'''


def test_an_error_on_one_rank_ends_every_rank_with_the_error_shown(tmp_path, tiny_model_dir):
    script = tmp_path / "fail_on_rank1.py"
    script.write_text(FAILING_RUN.format(root=ROOT, out=str(tmp_path / "out"), model=tiny_model_dir))
    # Rank 0 would wait forever in the next collective; torchrun must end it once rank 1 has failed.
    result = subprocess.run([*TORCHRUN, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "[rank1]: RuntimeError: Reward function 'answer_reward' raised KeyError: 'answer'" in result.stderr


def test_resume_under_torchrun_is_the_same_run(tmp_path):
    # S = 2, μ = 2: four optimizer steps per generation batch, so checkpoint-3 falls inside one.
    argv = ["--max_steps", "6", "--save_steps", "3", "--logging_steps", "1", "--eval_steps", "100",
            "--per_device_train_batch_size", "64", "--steps_per_generation", "2", "--num_iterations", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = _run([*TORCHRUN, "grpo.py", "--output_dir", str(straight), *argv, "--log_completions",
                  "--num_completions_to_print", "10000"])
    # The completions table holds every rank's rows, as TRL's: 2 ranks × N·S = 128 at each of the 6 logged steps.
    assert first.stdout.count(", advantage ") == 6 * 2 * 128
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")  # as if the run had died after step 3
    result = _run([*TORCHRUN, "grpo.py", "--output_dir", str(resumed), *argv, "--resume_from_checkpoint", "latest"])
    assert f"Resumed from {resumed}/checkpoint-3 at step 3." in result.stdout
    assert {"rank0.pt", "rank1.pt"} <= set(os.listdir(resumed / "checkpoint-3"))  # each rank's random state
    assert (resumed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()

    assert logged_rows(resumed) == logged_rows(straight)
    assert [row["step"] for row in logged_rows(straight)] == list(range(0, 7))  # 0: eval on start


def test_resume_under_fsdp_is_the_same_run_and_its_checkpoint_resumes_under_ddp(tmp_path):
    """A run sharded with --fsdp, stopped after step 3 and resumed (sharded, or under DDP) to step 6, ends with the
    weights and metrics of the straight run: the checkpoint holds the whole weights and the whole AdamW state. With
    SHARDED_STATE_DICT each rank writes and reads its own shards, to the same end. The reference model moves
    (sync_ref_model, every 2 steps) and the entropy bonus adapts its coefficient: the checkpoint holds both."""
    argv = ["--max_steps", "6", "--save_steps", "3", "--logging_steps", "1", "--eval_steps", "100",
            "--per_device_train_batch_size", "64", "--steps_per_generation", "2", "--num_iterations", "2",
            "--sync_ref_model", "--ref_model_sync_steps", "2", "--use_adaptive_entropy", "--entropy_target", "5"]
    shards = ["--fsdp", "--fsdp_config", '{"state_dict_type": "SHARDED_STATE_DICT"}']
    straight, straight_shards = tmp_path / "straight", tmp_path / "straight-shards"
    first = _run([*TORCHRUN, "grpo.py", "--fsdp", "--output_dir", str(straight), *argv])
    assert "[grpo] sampling each group's prompt once; the whole model gathered for sampling (--fsdp)." in first.stdout
    _run([*TORCHRUN, "grpo.py", *shards, "--output_dir", str(straight_shards), *argv])
    shard_files = sorted(os.listdir(straight_shards / "checkpoint-3" / "shards"))
    assert shard_files == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file a rank
    assert not (straight_shards / "checkpoint-3" / "model.safetensors").exists()

    for name, checkpoint, flags in [("fsdp", straight, ["--fsdp"]), ("ddp", straight, []),
                                    ("shards", straight_shards, shards)]:
        resumed = tmp_path / f"resumed-{name}"
        shutil.copytree(checkpoint / "checkpoint-3", resumed / "checkpoint-3")
        _run([*TORCHRUN, "grpo.py", *flags, "--output_dir", str(resumed), *argv, "--resume_from_checkpoint", "latest"])
        for out in (resumed, straight_shards):
            assert (out / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
        if name != "ddp":
            assert logged_rows(resumed) == logged_rows(straight)
        else:  # DDP's gradient norm is summed in another order than FSDP's: the same to float rounding
            for mine, theirs in zip(logged_rows(resumed), logged_rows(straight), strict=True):
                assert mine.keys() == theirs.keys()
                assert abs(mine.pop("grad_norm", 0) - theirs.pop("grad_norm", 0)) < 1e-6
                assert mine == theirs
    # the saved folder is an ordinary one: one process loads it, its LM head still tied to the embeddings
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(straight)
    saved = load_file(straight / "model.safetensors")
    assert "lm_head.weight" not in saved and model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in saved.items())


def test_a_sharded_rank_holds_half_of_what_a_ddp_rank_holds(tmp_path, tiny_model_dir):
    """Bytes of the weights, gradients and AdamW's moments one rank holds at the optimizer step (fsdp_memory.py), on
    2 ranks: DDP holds 16 bytes a parameter on each rank, FSDP2 half of it. While sampling, a sharded rank gathers the
    whole model beside its shard (sample_unsharded). So with cpu_ram_efficient_loading, where only rank 0 reads the
    weights."""
    for flags in ([], ["--fsdp"], ["--fsdp", "--efficient"]):
        _run([*TORCHRUN, os.path.join(HERE, "fsdp_memory.py"), str(tmp_path), tiny_model_dir, *flags])
    ddp, fsdp, efficient = ([json.loads((tmp_path / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]
                            for mode in ("ddp", "fsdp", "efficient"))
    whole = ddp[0]["whole_model"]  # 4 bytes a parameter in float32
    for rank in ddp:
        assert (rank["weights"], rank["gradients"], rank["optimizer_state"]) == (whole, whole, 2 * whole)
        assert rank["sampling_weights"] == whole
    for rank in fsdp + efficient:
        held = rank["weights"] + rank["gradients"] + rank["optimizer_state"]
        assert held <= 0.55 * 4 * whole, held / (4 * whole)
        assert rank["sampling_weights"] == whole and rank["shards"] == rank["weights"]
    # cpu_ram_efficient_loading: rank 1 reads no weights, builds on the meta device, and receives rank 0's weights
    # and rotary tables: the same step, bit for bit (the tables left unsent, the gradient norm moved by 4%)
    assert [rank["read_weights"] for rank in efficient] == [True, False] and fsdp[1]["read_weights"]
    assert efficient[0]["weights_hash"] == efficient[1]["weights_hash"] == fsdp[0]["weights_hash"]
