"""Bad input, round two: each case ends in correct behaviour or in one line that says what was wrong and what to
change, before the model loads wherever the input is known then, and nothing non-finite is ever saved as good."""

import dataclasses
import os
import shutil
import signal
import sys
import typing

import pytest
from datasets import Dataset

import grpo
from grpo import GRPOConfig, GRPOTrainer

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import letters_data, small_args  # noqa: E402

OUT_OF_RANGE = [  # (the command line as typed, the flag the error names, what it says)
    ("--max_prompt_length 0", "--max_prompt_length", "must be in [1, inf), got 0"),
    ("--max_prompt_length -3", "--max_prompt_length", "got -3"),
    ("--top_k -1", "--top_k", "must be in [0, inf), got -1"),
    ("--top_p -0.5", "--top_p", "must be in (0, 1], got -0.5"),
    ("--top_p 0", "--top_p", "makes all G completions identical"),
    ("--top-p 1.5", "--top-p", "must be in (0, 1], got 1.5"),
    ("--min_p 2", "--min_p", "must be in [0, 1], got 2"),
    ("--repetition_penalty 0", "--repetition_penalty", "must be in (0, inf), got 0"),
    ("--epsilon -0.5", "--epsilon", "clip bounds"),
    ("--epsilon_high -1", "--epsilon_high", "clip bounds cross"),
    ("--beta -1", "--beta", "reward moving away from the reference"),
    ("--learning_rate inf", "--learning_rate", "got inf"),
    ("--learning-rate nan", "--learning-rate", "got nan"),
    ("--learning_rate=-1e-3", "--learning_rate", "must be in [0, inf)"),
    ("--gradient_accumulation_steps 0", "--gradient_accumulation_steps", "got 0"),
    ("--steps_per_generation 0", "--steps_per_generation", "got 0"),
    ("--num_iterations 0", "--num_iterations", "got 0"),
    ("--per_device_train_batch_size -8", "--per_device_train_batch_size", "got -8"),
    ("--num_generations 1", "--num_generations", "a group of one"),
    ("--max_completion_length 0", "--max_completion_length", "got 0"),
    ("--temperature -1", "--temperature", "all G identical"),
    ("--max_grad_norm 0", "--max_grad_norm", "must be in (0, inf)"),
    ("--weight_decay -0.1", "--weight_decay", "got -0.1"),
    ("--warmup_ratio 1.5", "--warmup_ratio", "must be in [0, 1]"),
    ("--max_steps 0 --num_train_epochs 0", "--max_steps", "1 or more"),
    ("--max_steps -5", "--max_steps", "got -5"),
    ("--max_steps -1 --num_train_epochs 0", "--num_train_epochs", "would train on nothing"),
    ("--max_steps -1 --num_train_epochs -2", "--num_train_epochs", "got -2"),
    ("--logging_steps 0", "--logging_steps", "got 0"),
    ("--eval_steps 0", "--eval_steps", "got 0"),
    ("--save_steps -1", "--save_steps", "got -1"),
    ("--save_total_limit 0", "--save_total_limit", "got 0"),
    ("--logits_chunk_size -256", "--logits_chunk_size", "got -256"),
    ("--lora_r 0", "--lora_r", "got 0"),
    ("--lora_dropout 1", "--lora_dropout", "must be in [0, 1)"),
    ("--seed -1", "--seed", "must be in [0, 2**32)"),
    ("--per_device_eval_batch_size 0", "--per_device_eval_batch_size", "got 0"),
]


@pytest.mark.parametrize("command,flag,fragment", OUT_OF_RANGE, ids=[c for c, _, _ in OUT_OF_RANGE])
def test_every_numeric_knob_out_of_range_is_one_clear_line(command, flag, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        grpo.main([*command.split(), "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    last = err.strip().splitlines()[-1]
    assert last.endswith(".") and f": error: {flag} must " in last and fragment in last, err
    assert "Traceback" not in err
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_every_numeric_knob_has_a_range():
    def numeric(kind):
        return kind in (int, float) or any(k in (int, float) for k in typing.get_args(kind))

    checked_apart = {"max_steps", "num_train_epochs", "seed", "reward_weights"}  # check_ranges: messages of their own
    missing = [f.name for f in dataclasses.fields(GRPOConfig) if numeric(f.type) and f.type is not bool
               and grpo.BOUNDS[f]['low'] is grpo.BOUNDS[f]['above'] is None and f.name not in checked_apart]
    assert not missing, f"no range for {missing}"


def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(grpo, "load_policy", refuse)


@pytest.mark.parametrize("prompts", [["a=", "", "b=", "c="] * 2, ["   "] * 8, ["\n"] * 8], ids=["some", "blank", "newline"])
def test_empty_prompts_are_refused_before_the_model_loads(prompts, tmp_path, tiny_model_dir, monkeypatch):
    no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match=r"Prompt \d+ of the dataset is empty .*remove the rows"):
        GRPOTrainer(tiny_model_dir, "letters", args=small_args(tmp_path), train_dataset=Dataset.from_dict({"prompt": prompts}))


def test_an_empty_prompt_in_a_data_file_is_one_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a="}\n{"prompt": ""}\n' * 8)
    said = cli_error("--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "2")
    assert said.startswith("error: Prompt 1 of the dataset is empty")


def cli_error(*argv) -> str:
    """What `python grpo.py *argv` prints before it exits with status 1: main() raises SystemExit with that one
    line, which Python prints without a traceback (test_reliability runs one such command in a process of its own)."""
    with pytest.raises(SystemExit) as stop:
        grpo.main(list(argv))
    said = str(stop.value)
    assert "\n" not in said, said
    return said


def test_non_finite_weights_stop_the_run_and_nothing_is_saved(tmp_path, tiny_model_dir):
    args = small_args(tmp_path, max_steps=4, save_steps=1)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
    trainer.train(stop_after=1)  # one good step, saved as checkpoint-1
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e38  # what learning_rate=inf amounts to, once AdamW has moments: the weights overflow
    trainer.scheduler.base_lrs = [1e38] * len(trainer.scheduler.base_lrs)
    trainer.scheduler.lr_lambdas = [lambda step: 1.0] * len(trainer.scheduler.base_lrs)
    with pytest.raises(RuntimeError, match=r"weights are not finite after optimizer step 2 .*nothing was saved\. "
                                           r"The newest checkpoint, .*checkpoint-1, has finite weights"):
        trainer.train()
    assert grpo.list_checkpoints(args.output_dir) == [os.path.join(args.output_dir, "checkpoint-1")]
    assert not os.path.exists(os.path.join(args.output_dir, "model.safetensors"))
    with pytest.raises(RuntimeError, match="not finite"):
        trainer.checkpoints.save_model(str(tmp_path / "elsewhere"))
    assert not os.path.exists(tmp_path / "elsewhere")


def test_a_model_folder_without_its_tokenizer_is_named(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for name in os.listdir(folder):
        if name.startswith("tokenizer") or name.startswith("special_tokens"):
            os.remove(folder / name)
    with pytest.raises(OSError, match=r"Cannot load a tokenizer from the folder .*model'.*needs one of "
                                      r"\['spiece.model', 'tokenizer.json'"):
        GRPOTrainer(str(folder), "letters", args=small_args(tmp_path), train_dataset=letters_data())


def test_a_reward_file_that_does_not_exist_is_named(tmp_path, tiny_model_dir, monkeypatch):
    no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match=r"Reward 'path/that/does/not/exist.py:fn': there is no file "):
        GRPOTrainer(tiny_model_dir, "path/that/does/not/exist.py:fn", args=small_args(tmp_path),
                    train_dataset=letters_data())


def test_a_reward_from_a_file_is_loaded_and_named_by_its_function(tmp_path, tiny_model_dir):
    (tmp_path / "my_rewards.py").write_text("def short(completions, **kwargs):\n    return [-len(c) for c in completions]\n")
    trainer = GRPOTrainer(tiny_model_dir, f"{tmp_path}/my_rewards.py:short", args=small_args(tmp_path),
                          train_dataset=letters_data())
    assert trainer.reward_names == ["short"] and trainer.reward_funcs[0](prompts=["a"], completions=["ab"]) == [-2]


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_unusable_output_dir_is_refused_before_anything_loads(where, tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "taken").write_text("not a folder")
    output_dir = str(tmp_path / "taken") if where == "a file" else str(tmp_path / "taken" / "out")
    no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match=r"output_dir .* cannot be used .*Choose a folder you can write to"):
        GRPOTrainer(tiny_model_dir, "letters", args=small_args(tmp_path, output_dir=output_dir),
                    train_dataset=letters_data())
    assert "cannot be used" in cli_error("--output_dir", output_dir)


def test_a_reward_column_that_the_dataset_lacks_is_refused_before_the_model_loads(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match=r"'accuracy_reward' needs the column\(s\) \['answer'\], which the train "
                                         r"dataset lacks \(its columns: \['prompt'\]\)"):
        GRPOTrainer(tiny_model_dir, "accuracy", args=small_args(tmp_path), train_dataset=letters_data())

    def needs_difficulty(completions, difficulty, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"'needs_difficulty' needs the column\(s\) \['difficulty'\], which the eval"):
        GRPOTrainer(tiny_model_dir, needs_difficulty, args=small_args(tmp_path),
                    train_dataset=letters_data().add_column("difficulty", [1] * 16), eval_dataset=letters_data())


def test_ctrl_c_during_the_first_evaluation_says_nothing_was_saved(tmp_path, tiny_model_dir, capsys):
    args = small_args(tmp_path, max_steps=5, save_steps=1, eval_on_start=True)
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data(),
                          eval_dataset=letters_data(8))
    evaluate = trainer.report.evaluate

    def interrupted():
        os.kill(os.getpid(), signal.SIGINT)  # the handler train() installed only sets stop_signal
        return evaluate()

    trainer.report.evaluate = interrupted
    trainer.train()
    out = capsys.readouterr().out
    assert trainer.global_step == 0 and trainer.checkpoints.stop_signal == signal.SIGINT
    assert "Stopped by SIGINT before step 1: no step was taken, so nothing was saved." in out
    assert grpo.list_checkpoints(args.output_dir) == []
