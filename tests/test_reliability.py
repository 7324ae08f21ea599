"""Bad input is refused early with a message that says what to fix; checkpoints survive crashes; a resumed run
is the same run (bitwise on CPU); Ctrl-C saves and stops; non-finite steps are skipped."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset

import grpo
from grpo import GRPOTrainer

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import letters_data, params, read_metrics, small_args  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*argv, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a hub name fails at once instead of after the hub's retries
    return subprocess.run([sys.executable, "grpo.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, message", [
    (Dataset.from_dict({"prompt": []}), r"The train dataset is empty"),
    (Dataset.from_dict({"prompt": ["a="] * 3}), r"3 prompts, fewer than the 4 prompts of one generation batch"),
    (Dataset.from_dict({"prompt": [[{"text": "hi"}]] * 8}),
     r"Prompt 0 of the dataset is \[\{'text': 'hi'\}\]; a prompt must be a string or a list of"),
])
def test_unusable_datasets_are_refused_before_the_model_is_loaded(tmp_path, tokenizer, data, message):
    # The model path does not exist: reaching it would raise a different error, so the check came first.
    with pytest.raises(ValueError, match=message):
        GRPOTrainer("does-not/exist", "letters", args=small_args(tmp_path, per_device_train_batch_size=16),
                    train_dataset=data, processing_class=tokenizer)


def test_conversational_prompts_need_a_chat_template_checked_before_the_model(tmp_path, tokenizer):
    no_template = grpo.build_char_tokenizer()
    no_template.chat_template = None
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "a="}]] * 8})
    with pytest.raises(ValueError, match=r"conversational .* but the tokenizer has no chat template"):
        GRPOTrainer("does-not/exist", "letters", args=small_args(tmp_path), train_dataset=data,
                    processing_class=no_template)


def test_missing_pad_token_uses_eos_and_says_so_once(tmp_path, tiny_model_dir, capsys):
    tok = grpo.build_char_tokenizer()
    tok.pad_token = None
    GRPOTrainer(tiny_model_dir, "letters", args=small_args(tmp_path, max_steps=1), train_dataset=letters_data(),
                processing_class=tok).train()
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert capsys.readouterr().out.count("has no pad token; using its EOS token '<|endoftext|>'") == 1


def test_long_prompts_are_cut_from_the_left_with_a_warning_that_counts_them(tmp_path, tiny_model_dir, capsys):
    grpo._warned.discard("truncate")
    data = Dataset.from_dict({"prompt": ["abcdefgh="] * 4 + ["a="] * 4})
    GRPOTrainer(tiny_model_dir, "letters", args=small_args(tmp_path, max_steps=1, max_prompt_length=4),
                train_dataset=data).train()
    out = capsys.readouterr().out
    assert "prompts are longer than max_prompt_length=4 tokens; their start is cut off" in out
    ids, _ = grpo.tokenize_prompts(["abcdefgh=", "a="], GRPOTrainer.__init__.__globals__["AutoTokenizer"]
                                   .from_pretrained(tiny_model_dir), 4)
    assert ids.shape == (2, 4)


@pytest.mark.parametrize("value, message", [
    ("high", r"returned 'high' for completion 0; rewards must be numbers, or None"),
    (float("nan"), r"returned nan for completion 0 \(prompt '\w='\); rewards must be finite. Return None"),
    (float("inf"), r"returned inf for completion 0 .*rewards must be finite"),
])
def test_rewards_that_are_not_finite_numbers_are_refused_naming_the_function(tmp_path, tiny_model_dir, value,
                                                                             message):
    def odd(completions, **kwargs):
        return [value] + [0.0] * (len(completions) - 1)

    with pytest.raises(ValueError, match=r"Reward function 'odd' " + message):
        GRPOTrainer(tiny_model_dir, odd, args=small_args(tmp_path, max_steps=1), train_dataset=letters_data()).train()


@pytest.mark.parametrize("reward, message", [
    (lambda completions, **kw: [None] * len(completions),
     "every reward function returned None for every completion of the generation batch of step {k}"),
    (lambda completions, **kw: [1.0] * len(completions),
     "no learning signal yet: in every group of the generation batch of step {k} the 4 completions got the same "
     "reward (mean 1), so every advantage is 0, and so it was for all {k} batches so far"),
])
def test_a_run_that_never_had_a_learning_signal_is_warned_with_how_often(tmp_path, tiny_model_dir, capsys, reward,
                                                                          message):
    trainer = GRPOTrainer(tiny_model_dir, reward, args=small_args(tmp_path, max_steps=4), train_dataset=letters_data())
    trainer.train()
    out = capsys.readouterr().out
    # Warned at the 1st, 2nd and 4th silent batch, not at the 3rd: the count doubles between warnings.
    assert [message.format(k=k) in out for k in (1, 2, 3, 4)] == [True, True, False, True], out
    assert [row["grad_norm"] for row in read_metrics(trainer.args)] == [0.0] * 4  # all advantages 0, no gradient


def test_equal_rewards_after_learning_get_one_note_not_a_warning(tmp_path, tiny_model_dir, capsys):
    """The demo's perfect run: every completion scores the best reward, so every group's std is 0. That is
    success, and it is said once, without the word warning."""
    grpo._warned.discard("silent-after-signal")
    calls = []

    def solved_after_one_batch(completions, **kwargs):
        calls.append(1)
        return [float(i % 2) for i in range(len(completions))] if len(calls) == 1 else [5.0] * len(completions)

    GRPOTrainer(tiny_model_dir, solved_after_one_batch, args=small_args(tmp_path, max_steps=4),
                train_dataset=letters_data()).train()
    out = capsys.readouterr().out
    assert out.count("[grpo] note: from step 2 on, some generation batches have equal rewards within every group "
                     "(this one: mean reward 5)") == 1
    assert "warning" not in out


@pytest.mark.slow
def test_cli_bad_paths_and_checkpoints_get_one_line(tmp_path):
    cases = [
        (["--dataset_name", str(tmp_path / "missing.jsonl")], "error: dataset file"),
        (["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", "x.jsonl"],
         "is neither a local folder nor a hub name"),
        (["--model_name_or_path", "./no-model", "--dataset_name", "x.jsonl"], "is neither a local folder nor a hub name"),
        (["--resume_from_checkpoint", str(tmp_path / "nothing")], "is not a checkpoint folder (no trainer_state.json)"),
        (["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"], "has no complete checkpoint-N folder"),
    ]
    for argv, message in cases:  # in this process: main() raises SystemExit with one line, no traceback
        with pytest.raises(SystemExit) as stop:
            grpo.main(["--output_dir", str(tmp_path / "out"), *argv])
        said = str(stop.value)
        assert said.startswith("error: ") and message in said and "\n" not in said, said
    # A hub name that cannot be reached, from the command line (HF_HUB_OFFLINE must be set before the hub is used).
    result = run_cli("--model_name_or_path", "does-not/exist", "--dataset_name", "data/letters_chat.jsonl")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: Cannot load 'does-not/exist' with AutoTokenizer: " in result.stderr


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "is empty."),
    ("blank.jsonl", "\n\n", "has no rows."),
    ("broken.jsonl", '{"prompt": "a="}\n{"prompt": "b=",\n', "line 2: not valid JSON (Expecting property name"),
    ("string.jsonl", '{"prompt": "a="}\n"b="\n', "line 2: a JSON string, not an object"),
    ("empty.json", "", "is empty."),
    ("broken.json", '[{"prompt": "a="},\n {"prompt": "b="\n]', "line 3: not valid JSON (Expecting ',' delimiter"),
    ("empty.csv", "", "is empty."),
    ("header.csv", "prompt\n", "has no rows."),
    ("broken.csv", 'prompt,answer\n"a=,1\n', "cannot be read as csv: Error tokenizing data"),
    ("empty.parquet", "", "is empty."),
    ("broken.parquet", "PAR1 not parquet", "cannot be read as parquet: Parquet magic bytes not found"),
])
def test_a_broken_data_file_gets_one_line_that_names_it(tmp_path, tiny_model_dir, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SystemExit) as stop:
        grpo.main(["--model_name_or_path", tiny_model_dir, "--dataset_name", str(path), "--reward_funcs", "letters",
                   "--output_dir", str(tmp_path / "out")])
    said = str(stop.value)  # SystemExit with a message: printed as one line, no traceback
    assert said.startswith(f"error: dataset file {str(path)!r}") and message in said and "\n" not in said, said


def test_a_good_json_lines_file_named_json_still_loads(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('{"prompt": "a="}\n{"prompt": "b="}\n')
    assert grpo.load_data_file(str(path))["prompt"] == ["a=", "b="]


# -- checkpoints and exact resume -------------------------------------------------------------------------


def resume_args(tmp_path, out, **kw):
    # S = 2, μ = 2, GA = 1: four optimizer steps per generation batch, so a checkpoint at step 6 falls in the
    # middle of one (its completions and old log-probs must be saved). 4 prompts, B = 2: a pass over the data is
    # 8 steps, so the resumed part crosses into a new pass. β > 0 and evaluation are on.
    base = dict(output_dir=str(tmp_path / out), per_device_train_batch_size=4, steps_per_generation=2,
                num_iterations=2, gradient_accumulation_steps=1, max_steps=12, save_steps=6, beta=0.04,
                eval_strategy="steps", eval_steps=4, eval_on_start=True)
    return small_args(tmp_path, **{**base, **kw})


def make_trainer(args, tiny_model_dir):
    data = Dataset.from_dict({"prompt": ["a=", "bc=", "d=", "hgf="]})
    return GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=data,
                       eval_dataset=Dataset.from_dict({"prompt": ["e=", "fa="]}))


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "step_time"} for row in rows]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir):
    """12 steps without stopping: the run that every resumed run must reproduce."""
    tmp_path = tmp_path_factory.mktemp("straight")
    trainer = make_trainer(resume_args(tmp_path, "straight"), tiny_model_dir)
    trainer.train()
    return trainer, read_metrics(trainer.args)


def test_a_checkpoint_holds_everything_needed_to_continue(straight):
    trainer, _ = straight
    path = os.path.join(trainer.args.output_dir, "checkpoint-6")
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "state.pt",
            "rank0.pt"} <= set(os.listdir(path))
    with open(os.path.join(path, "trainer_state.json")) as f:
        saved = json.load(f)
    assert (saved["global_step"], saved["micro_step"]) == (6, 6)
    assert saved["config"]["num_iterations"] == 2
    mine = torch.load(os.path.join(path, "rank0.pt"))
    assert set(mine["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert len(mine["micro_batches"]) == 2  # the S micro-batches of the generation batch under way
    assert mine["micro_batches"][0]["old_per_token_logps"] is not None
    state = torch.load(os.path.join(path, "state.pt"))
    assert len(state["optimizer"]["state"]) > 0 and state["scheduler"]["last_epoch"] == 6


def test_stop_and_resume_is_bitwise_the_same_run(tmp_path, tiny_model_dir, straight):
    reference, reference_rows = straight
    first = make_trainer(resume_args(tmp_path, "resumed"), tiny_model_dir)
    first.train(stop_after=6)
    del first
    second = make_trainer(resume_args(tmp_path, "resumed", resume_from_checkpoint="latest"), tiny_model_dir)
    assert second.global_step == 6
    second.train()
    assert torch.equal(params(second.model), params(reference.model))
    rows = read_metrics(second.args)
    assert [row["step"] for row in rows] == list(range(0, 13))  # step 0: the evaluation before training
    assert without_time(rows) == without_time(reference_rows)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_to_resume_from(tmp_path, tiny_model_dir, straight):
    reference, _ = straight
    args = resume_args(tmp_path, "crash", save_steps=3)
    trainer = make_trainer(args, tiny_model_dir)
    real_save = trainer.tokenizer.save_pretrained

    def dies_in_checkpoint_9(directory, *a, **kw):
        real_save(directory, *a, **kw)
        if "checkpoint-9" in str(directory):
            raise OSError("No space left on device")

    trainer.tokenizer.save_pretrained = dies_in_checkpoint_9
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert grpo.list_checkpoints(args.output_dir) == [os.path.join(args.output_dir, f"checkpoint-{k}") for k in (3, 6)]
    assert os.path.isdir(os.path.join(args.output_dir, "checkpoint-9.tmp"))  # the half-written one, ignored
    resumed = make_trainer(resume_args(tmp_path, "crash", save_steps=3, resume_from_checkpoint="latest"), tiny_model_dir)
    assert resumed.global_step == 6
    resumed.train()
    assert torch.equal(params(resumed.model), params(reference.model))
    assert grpo.list_checkpoints(args.output_dir)[-2:] == [os.path.join(args.output_dir, f"checkpoint-{k}")
                                                            for k in (9, 12)]


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, tiny_model_dir):
    args = small_args(tmp_path, max_steps=5, save_steps=1, save_total_limit=2)
    GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data()).train()
    assert sorted(name for name in os.listdir(args.output_dir) if "checkpoint" in name) == ["checkpoint-4",
                                                                                           "checkpoint-5"]


def test_resuming_with_a_different_batch_is_refused(tmp_path, tiny_model_dir, straight):
    reference, _ = straight
    checkpoint = os.path.join(reference.args.output_dir, "checkpoint-6")
    with pytest.raises(ValueError, match=r"must not change.*num_iterations: 2 in the checkpoint, 1 now"):
        make_trainer(resume_args(tmp_path, "other", num_iterations=1, gradient_accumulation_steps=2,
                                 resume_from_checkpoint=checkpoint), tiny_model_dir)


# -- signals and non-finite steps -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_saves_a_checkpoint_and_the_run_resumes_where_it_stopped(tmp_path, sig, capsys):
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--max_steps", "15", "--logging_steps", "1", "--eval_steps", "1000",
            "--eval_on_start", "False"]  # metrics.jsonl then appears with step 1, when the signal handler is set
    process = subprocess.Popen([sys.executable, "grpo.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, output[-2000:]
    step = int(output.split(f"Stopped by {sig.name} after step ")[1].split(";")[0])
    assert 0 < step < 15
    assert f"saved {out}/checkpoint-{step}. Resume with --resume_from_checkpoint {out}/checkpoint-{step}" in output
    assert not (out / "model.safetensors").exists()  # the final model is only written by a finished run

    grpo.main([*argv, "--resume_from_checkpoint", "latest"])  # in this process: its start-up costs 7 s
    assert f"Resumed from {out}/checkpoint-{step} at step {step}." in capsys.readouterr().out
    assert [row["step"] for row in map(json.loads, open(out / "metrics.jsonl"))] == list(range(1, 16))


def test_non_finite_steps_are_skipped_and_three_in_a_row_stop_with_the_last_good_weights(tmp_path, tiny_model_dir,
                                                                                      capsys):
    args = small_args(tmp_path, max_steps=10)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
    poisoned = {2, 4, 5, 6}  # micro-steps (= optimizer steps here) whose loss becomes NaN
    compute_loss = trainer.compute_loss
    trainer.compute_loss = lambda batch: compute_loss(batch) * (math.nan if trainer.micro_step in poisoned else 1.0)
    weights = {}
    original_step = trainer.optimizer_step

    def recording_step(loss):
        weights[trainer.global_step] = params(trainer.model)  # before the step
        original_step(loss)

    trainer.optimizer_step = recording_step
    with pytest.raises(RuntimeError, match=r"not finite for 3 optimizer steps in a row \(up to step 6\).*"
                                           r"checkpoint-6 holds the weights of step 3"):
        trainer.train()
    assert not torch.equal(weights[1], weights[0])  # step 1 was good
    assert torch.equal(weights[2], weights[1])  # step 2 was skipped
    assert not torch.equal(weights[3], weights[2])  # step 3 was good again
    assert torch.equal(params(trainer.model), weights[3])  # 4, 5, 6 skipped
    assert "optimizer step skipped (1 in a row)" in capsys.readouterr().out
    saved = torch.load(os.path.join(args.output_dir, "checkpoint-6", "state.pt"))
    assert saved["history"][-1]["step"] == 6 and math.isnan(saved["history"][-1]["loss"])


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_checkpoint_that_resumes_exactly(tmp_path):
    # A checkpoint every step; the kill comes as soon as a checkpoint-N.tmp folder appears, in the middle of
    # writing the second checkpoint or a later one.
    argv = ["--max_steps", "25", "--save_steps", "1", "--save_total_limit", "2", "--logging_steps", "1",
            "--eval_steps", "1000"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    grpo.main(["--output_dir", str(straight), *argv])  # the straight run and the resume in this process, to save
    # the 7 s a process takes to start: the same code on the same threads computes the same bits
    process = subprocess.Popen([sys.executable, "grpo.py", "--output_dir", str(killed), *argv], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    def saving():
        return any(name.startswith("checkpoint-") and name.endswith(".tmp") for name in os.listdir(killed))

    while time.time() < deadline and not (grpo.list_checkpoints(str(killed)) and saving()):
        time.sleep(0.001)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert saving()  # killed in the middle of a save
    assert not (killed / "model.safetensors").exists()  # it died before the end
    grpo.main(["--output_dir", str(killed), *argv, "--resume_from_checkpoint", "latest"])
    assert (killed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert without_time(read_metrics(grpo.GRPOConfig(output_dir=str(killed)))) == \
        without_time(read_metrics(grpo.GRPOConfig(output_dir=str(straight))))


def test_a_lora_run_resumes_exactly_from_its_adapter_checkpoint(tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft")

    def lora_trainer(out, **kw):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        args = small_args(tmp_path, output_dir=str(tmp_path / out), beta=0.1, max_steps=4, save_steps=2,
                          learning_rate=2e-2, **kw)
        return GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data(), peft_config=config)

    straight = lora_trainer("straight")
    straight.train()
    path = os.path.join(straight.args.output_dir, "checkpoint-2")
    assert "adapter_model.safetensors" in os.listdir(path)  # a LoRA checkpoint holds the adapter, not the base
    resumed = lora_trainer("resumed", resume_from_checkpoint=path)
    resumed.train()
    assert torch.equal(params(resumed.model), params(straight.model))
    assert not torch.equal(params(resumed.model), params(lora_trainer("fresh").model))  # the adapter did train


def test_a_signal_that_comes_after_the_ranks_agreed_is_saved_at_the_next_step(tmp_path, tiny_model_dir, capsys):
    """The ranks decide whether to stop before the step is logged; a signal during the logging (as when a user
    presses Ctrl-C on seeing a new line) is acted on at the next optimizer step, with a checkpoint, never dropped."""
    args = small_args(tmp_path, max_steps=5)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
    after_step = trainer.report.after_step

    def logging_then_interrupted(*a):
        after_step(*a)
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # after the ranks agreed on step 1 (step_is_finite)

    trainer.report.after_step = logging_then_interrupted
    trainer.train()
    assert trainer.global_step == 2 and trainer.checkpoints.stopped
    assert grpo.list_checkpoints(args.output_dir) == [os.path.join(args.output_dir, "checkpoint-2")]
    assert "Stopped by SIGINT after step 2; saved" in capsys.readouterr().out
