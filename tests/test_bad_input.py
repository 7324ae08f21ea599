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


# -- round three: each of the seven causes, by a variant of the case that found it ---------------------------------


def test_a_new_run_does_not_mix_with_an_earlier_runs_checkpoints(tmp_path, tiny_model_dir, monkeypatch):
    """Cause 1: a run that does not resume refuses to start beside another run's checkpoints (whose rotation it
    would have deleted its own by, and which `latest` would have resumed); overwrite_output_dir deletes them."""
    GRPOTrainer(tiny_model_dir, "letters", args=small_args(tmp_path, max_steps=2, save_steps=1),
                train_dataset=letters_data()).train()
    later = GRPOTrainer(tiny_model_dir, "letters", args=small_args(tmp_path, max_steps=2, save_steps=1,
                                                                 learning_rate=5e-4), train_dataset=letters_data())
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-1, checkpoint-2\)\. "
                                         r"Continue that run with --resume_from_checkpoint latest.*--overwrite_output_dir"):
        later.train()
    out = str(tmp_path / "out")
    no_model_loads(monkeypatch)  # the command line refuses before the model loads
    said = cli_error("--model_name_or_path", tiny_model_dir, "--dataset_name", str(write_prompts(tmp_path)),
                     "--output_dir", out, "--max_steps", "2")
    assert said.startswith(f"error: output_dir '{out}' holds checkpoints of an earlier run")
    monkeypatch.undo()
    fresh = GRPOTrainer(tiny_model_dir, "letters", train_dataset=letters_data(),
                        args=small_args(tmp_path, max_steps=1, save_steps=1, overwrite_output_dir=True))
    fresh.train()
    assert grpo.list_checkpoints(out) == [os.path.join(out, "checkpoint-1")]  # the earlier run's checkpoint-2 gone


def write_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(f'{{"prompt": "{c}="}}\n' for c in "abcdefgh") * 2)
    return path


def test_every_save_writes_inside_output_dir(tmp_path, tiny_model_dir, monkeypatch):
    """Cause 1: the start-up check writes to output_dir, so every save must write there too; the final model went
    through <output_dir>.tmp in the parent, which may be read-only."""
    written = []
    save_pretrained = grpo.PreTrainedModel.save_pretrained
    monkeypatch.setattr(grpo.PreTrainedModel, "save_pretrained",
                        lambda self, path, **kw: written.append(path) or save_pretrained(self, path, **kw))
    args = small_args(tmp_path, max_steps=2, save_steps=1)
    GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data()).train()
    out = os.path.abspath(args.output_dir)
    assert len(written) == 3 and all(os.path.abspath(p).startswith(out + os.sep) for p in written), written
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing beside it
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize("prompts, message", [
    ([[{"role": "user", "content": None}]] * 8, r"Prompt 0 of the dataset has a message whose content is None"),
    ([[{"role": "user", "content": [{"type": "text", "text": "a="}]}]] * 8, r"content is \[\{'type': 'text'"),
    (["a="] * 4 + [[{"role": "user", "content": "b="}]] * 4, r"mixes string prompts and chat prompts \(prompt 0 is a "
                                                              r"string, prompt 4 is not\)"),
], ids=["content None", "content a list", "mixed kinds"])
def test_prompts_that_would_train_on_the_wrong_text_are_refused(tmp_path, tokenizer, prompts, message):
    """Cause 2: a message's content must be text, and a dataset holds one kind of prompt (as a dict: Arrow would not
    even hold the mixed one)."""
    with pytest.raises(ValueError, match=message):
        grpo.load_tokenizer("unused", tokenizer, small_args(tmp_path), {"prompt": prompts})


def test_a_tokenizer_without_pad_or_eos_pads_with_the_models_eos(tmp_path, tiny_model_dir, capsys):
    """Cause 2: the model's generation config names EOS 0 (<|endoftext|>): that is the pad, as the message says."""
    tok = grpo.build_char_tokenizer()
    tok.pad_token = tok.eos_token = None
    grpo._warned.clear()
    grpo.load_tokenizer(tiny_model_dir, tok, small_args(tmp_path), {"prompt": ["a="]})
    assert tok.pad_token == "<|endoftext|>"
    assert "using the model's EOS token '<|endoftext|>' for padding" in capsys.readouterr().out


def test_a_chat_template_that_raises_names_the_prompt(tmp_path, tokenizer):
    """Cause 3: jinja's error alone does not say which prompt; here the template refuses a system message."""
    tok = grpo.build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    prompts = [[{"role": "user", "content": "a="}], [{"role": "system", "content": "x"}, {"role": "user", "content": "b"}]]
    with pytest.raises(ValueError, match=r"chat template refused prompt 1 of the dataset .*System role not supported"):
        grpo.load_tokenizer("unused", tok, small_args(tmp_path), {"prompt": prompts})


def test_a_damaged_model_file_is_named_in_one_line(tmp_path, tiny_model_dir):
    """Cause 3: a model.safetensors cut short (a copy that did not finish)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError, match=r"Cannot load '.*model' with AutoModelForCausalLM \(SafetensorError: .*a file "
                                      r"there is damaged or was not written to its end; copy or download it again"):
        GRPOTrainer(str(folder), "letters", args=small_args(tmp_path), train_dataset=letters_data())


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_model_dir):
    """A run of 2 steps with a checkpoint at each, to damage in the tests below (each on a copy)."""
    out = tmp_path_factory.mktemp("saved")
    GRPOTrainer(tiny_model_dir, "letters", args=small_args(out, max_steps=2, save_steps=1),
                train_dataset=letters_data()).train()
    return out


@pytest.mark.parametrize("damage, file", [
    (lambda c: (c / "trainer_state.json").write_text('{"global_step": 2, "micro'), "trainer_state.json"),
    (lambda c: (c / "state.pt").write_bytes((c / "state.pt").read_bytes()[:100]), "state.pt"),
    (lambda c: (c / "rank0.pt").write_bytes(os.urandom(256)), "rank0.pt"),
], ids=["truncated trainer_state.json", "truncated state.pt", "random rank0.pt"])
def test_a_damaged_checkpoint_is_named_and_another_offered(tmp_path, tiny_model_dir, saved_run, damage, file):
    """Cause 3: each file of a checkpoint that cannot be read is named, with the checkpoints left to resume from,
    never torch's advice to load with weights_only=False."""
    shutil.copytree(saved_run, tmp_path, dirs_exist_ok=True)
    damage(tmp_path / "out" / "checkpoint-2")
    args = small_args(tmp_path, max_steps=2, resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    with pytest.raises(ValueError) as err:
        GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data())
    said = str(err.value)
    assert f"{file} cannot be read" in said and "resume from another one (checkpoint-1)" in said, said
    assert "weights_only" not in said


def test_a_checkpoint_of_another_model_size_is_named(tmp_path, saved_run):
    """Cause 3: the same architecture, twice as wide: its weights cannot fit the checkpoint's."""
    wider = grpo.save_demo_model(str(tmp_path / "wide"), num_heads=4)
    config = grpo.AutoModelForCausalLM.from_pretrained(wider).config
    config.hidden_size, config.intermediate_size = 128, 256
    grpo.AutoModelForCausalLM.from_config(config).save_pretrained(wider)
    shutil.copytree(saved_run, tmp_path, dirs_exist_ok=True)
    args = small_args(tmp_path, max_steps=2, resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    with pytest.raises(ValueError, match=r"the model's weights cannot be read \(RuntimeError: Error\(s\) in loading "
                                         r"state_dict.*damaged or of another model"):
        GRPOTrainer(wider, "letters", args=args, train_dataset=letters_data())


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path):
    """Cause 4: a 20-row embedding under the 58-token character tokenizer: ids from 20 on would index past it."""
    model = grpo.save_demo_model(str(tmp_path / "small-vocab"), characters="abcdefgh=")  # V = 11
    with pytest.raises(ValueError, match=r"The tokenizer has 58 tokens but the model's embedding has 11 rows"):
        GRPOTrainer(model, "letters", args=small_args(tmp_path), train_dataset=letters_data(),
                    processing_class=grpo.build_char_tokenizer())


def test_an_async_reward_is_awaited_as_trl_awaits_it(tmp_path, tiny_model_dir):
    """Cause 5: TRL 1.16 awaits an `async def` reward; its values reach the metrics like a plain function's."""
    async def letters_async(prompts, completions, **kwargs):
        return grpo.letters_reward(prompts, completions)

    trainer = GRPOTrainer(tiny_model_dir, letters_async, args=small_args(tmp_path, max_steps=1),
                          train_dataset=letters_data())
    rows = trainer.train()
    assert rows[-1]["rewards/letters_async/mean"] == rows[-1]["reward"]
    assert grpo.awaited(letters_async(["a="], ["aaaaa"])) == [5.0]


def test_a_reward_without_kwargs_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    """Cause 5: every reward is given prompts, completions, completion_ids and the other columns as keywords."""
    def short(completions):
        return [-len(c) for c in completions]

    no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match=r"Reward function 'short' does not take \['prompts', 'completion_ids'\].*add "
                                         r"\*\*kwargs"):
        GRPOTrainer(tiny_model_dir, short, args=small_args(tmp_path), train_dataset=letters_data())


@pytest.mark.parametrize("argv, message", [
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "lowers the rate when a metric stops improving"),
    (["--lr_scheduler_type", "warmup_stable_decay"], "needs num_decay_steps in --lr_scheduler_kwargs"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "needs min_lr or min_lr_rate in --lr_scheduler_kwargs"),
    (["--lr_scheduler_type", "cosine_with_minlr"], "Unknown --lr_scheduler_type 'cosine_with_minlr'"),
    (["--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", '{"power": 2}'], "which cosine does not take"),
    (["--top_k", "1"], "top_k 1 keeps only the most likely token"),
], ids=["plateau", "wsd", "min_lr", "misspelt", "wrong kwargs", "top_k 1"])
def test_schedules_and_sampling_knobs_are_refused_before_the_model_loads(argv, message, tmp_path, tiny_model_dir,
                                                                        monkeypatch, capsys):
    """Causes 6 and 7: the schedule is checked as a knob (named as typed), not at the first step."""
    no_model_loads(monkeypatch)
    with pytest.raises(SystemExit):
        grpo.main(["--model_name_or_path", tiny_model_dir, "--dataset_name", str(write_prompts(tmp_path)),
                   "--output_dir", str(tmp_path / "out"), *argv])
    assert message in capsys.readouterr().err


def test_a_schedule_with_its_settings_trains(tmp_path, tiny_model_dir):
    """Cause 6: cosine_with_min_lr with its min_lr_rate, passed on to transformers: the last step's rate is the floor."""
    args = small_args(tmp_path, max_steps=3, learning_rate=1e-3, lr_scheduler_type="cosine_with_min_lr",
                      lr_scheduler_kwargs='{"min_lr_rate": 0.1}')
    rows = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data()).train()
    # transformers' cosine_with_min_lr at step 2 of 3: 0.1 + 0.9 · (1 + cos(2π/3)) / 2 = 0.325 of the peak
    assert rows[0]["learning_rate"] == pytest.approx(1e-3) and rows[-1]["learning_rate"] == pytest.approx(3.25e-4)


def test_a_text_file_is_named_as_an_unsupported_type(tmp_path):
    """Cause 7: `Couldn't find any data file` blamed the path of a file that exists."""
    (tmp_path / "prompts.txt").write_text("a=\nb=\n")
    said = cli_error("--dataset_name", str(tmp_path / "prompts.txt"), "--output_dir", str(tmp_path / "out"))
    assert said == (f"error: dataset file '{tmp_path / 'prompts.txt'}' is a .txt; the data files read here are .json, "
                    f".jsonl, .csv and .parquet, with a `prompt` column.")


def test_prompts_and_completions_beyond_learned_positions_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    """Cause 4: GPT-2 with 32 learned positions, 9-token prompts and completions of up to 30 tokens: 39 positions.
    Rotary models (the demo's Qwen2) compute any position and are not limited."""
    from transformers import GPT2Config

    folder = str(tmp_path / "gpt2")
    tok = grpo.build_char_tokenizer()
    GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=1, n_head=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    no_model_loads(monkeypatch)
    data = Dataset.from_dict({"prompt": ["abcdefgh="] * 8})
    with pytest.raises(ValueError, match=r"The longest prompt is 9 tokens and a completion may take "
                                         r"max_completion_length=30: 39 positions, but the model has 32"):
        GRPOTrainer(folder, "letters", args=small_args(tmp_path, max_completion_length=30), train_dataset=data)
