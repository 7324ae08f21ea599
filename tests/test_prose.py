"""The prose states facts; these tests hold it to them. README.md, shapes.md, the notebooks and grpo.py's own
docstring say things about defaults, step counts, the paths that run and the results of the demo: each such fact
is read out of the text here and compared with the code or with a run, so that a change cannot make it silently
false."""

import ast
import inspect
import json
import re
from pathlib import Path

import pytest
import grpo

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SHAPES = (ROOT / "shapes.md").read_text()
GRPO_PY = (ROOT / "grpo.py").read_text()
PART_ONE = GRPO_PY[:GRPO_PY.index("\n# Part II")]  # every line above the one that says "# Part II"
NOTEBOOKS = {path.name: "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"])
             for path in sorted((ROOT / "tutorials").glob("*.ipynb"))}


def test_grpo_py_lines_fit_120_columns():
    """Code and prose fit 120 columns; only the knobs' help strings, which --help wraps, run longer."""
    long = [number for number, line in enumerate(GRPO_PY.splitlines(), start=1)
            if len(line) > 120 and "knob(" not in line and "why=" not in line and '"help":' not in line]
    assert not long, f"grpo.py lines over 120 characters: {long}"


def demo_numbers() -> dict:
    """What the demo's settings make of the batch, as its start-up line states them."""
    a = grpo.DEMO_ARGS
    B = a["per_device_train_batch_size"] // a["num_generations"]  # S = GA = 1
    return dict(B=B, G=a["num_generations"], steps=a["max_steps"], beta=a["beta"])


@pytest.mark.parametrize("name", ["grpo.py", "README.md", "shapes.md", "bench.py", *NOTEBOOKS])
def test_nothing_cites_documents_a_reader_does_not_have(name):
    text = NOTEBOOKS.get(name) or (ROOT / name).read_text()
    for phrase in ("REFERENCE.md", "the seed", "seed's", "seed document", "GRPO-seed", "../shared"):
        assert phrase not in text, f"{name} cites {phrase!r}"


def test_the_docstring_states_the_objective_of_the_default_loss():
    default = grpo.GRPOConfig.__dataclass_fields__["loss_type"].default
    assert re.search(r'default loss_type="(\w+)"', grpo.__doc__).group(1) == default


def test_the_readme_demo_log_states_the_demo_settings():
    n = demo_numbers()
    line = (f"B={n['B']} prompts × G={n['G']}\ncompletions per generation batch, S=1, μ=1, {n['steps']} optimizer steps, "
            f"rewards ['letters_reward']")
    assert line in README
    assert f"Trained {n['steps']} steps in" in README
    assert f"The demo's β = {n['beta']} keeps" in README
    model = grpo.build_tiny_model(grpo.build_char_tokenizer(grpo.DEMO_ALPHABET + "="))
    parameters, prompts = sum(p.numel() for p in model.parameters()), len(grpo.build_demo_dataset())
    assert f"GRPO: {parameters:,} parameters on " in README and f"threads, {prompts} prompts, B=" in README


def test_the_readme_names_the_paths_the_demo_runs(tmp_path, capsys):
    model = grpo.save_demo_model(str(tmp_path / "model"), characters=grpo.DEMO_ALPHABET + "=")
    args = grpo.GRPOConfig(output_dir=str(tmp_path), **{**grpo.DEMO_ARGS, "max_steps": 1})
    grpo.GRPOTrainer(model, "letters", args=args, train_dataset=grpo.build_demo_dataset())
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[grpo] ")]
    assert said and said[0] in README, said


def readme_held_out_rewards() -> tuple[float, float]:
    before, after = re.search(r"held-out prompts × \d+ completions: (-?[\d.]+) before training -> (-?[\d.]+) after",
                              README).groups()
    return float(before), float(after)


def check_demo_result(eval_rewards: list[float]) -> None:
    """Called by test_tutorials.py with the held-out rewards of notebook 05's run: the README's log shows
    the reward before training that the run starts from, and an end reward that clears the bound the test asserts."""
    before, after = readme_held_out_rewards()
    assert abs(before - eval_rewards[0]) < 0.01, (before, eval_rewards[0])
    assert after > 4.8 and abs(after - eval_rewards[-1]) < 0.2, (after, eval_rewards[-1])


def test_every_shape_letter_the_code_uses_is_defined_in_shapes_md():
    source = (ROOT / "grpo.py").read_text()
    shapes = re.findall(r'(?:Tensor, |trace\("[^"]*", "[^"]*", \w+(?:\.\w+)*, )"([^"]*)"', source)
    letters = {token for shape in shapes for token in re.findall(r"[A-Z]+", shape)}
    table = set(re.findall(r"^\| ([A-Z, μ]+) \|", SHAPES, re.M))
    defined = {letter.strip() for row in table for letter in row.split(",")} | {"BG"}
    assert letters and letters <= defined, f"shapes.md does not define {sorted(letters - defined)}"


def test_the_tutorials_describe_the_split_the_trainer_makes():
    batch = grpo.GenerationBatch(*(grpo.torch.arange(8).reshape(8, 1),) * 4, grpo.torch.arange(8.0), None, None, 8.0)
    grpo.torch.manual_seed(0)
    rows = [part.advantages.tolist() for part in batch.shuffled_split(2)]
    assert rows != [[0, 1, 2, 3], [4, 5, 6, 7]]  # shuffled first, so the notebook must not say "consecutive slices"
    assert "consecutive slices" not in NOTEBOOKS["01_sampling_and_batches.ipynb"]
    assert "shuffles the B·G rows" in NOTEBOOKS["01_sampling_and_batches.ipynb"]



def test_the_readme_stays_a_readers_guide():
    assert len(README.encode()) <= 20_000, "README.md is over 20 KB: move the detail next to the code it describes"
    assert "### From PPO to GRPO" in README and "### A reading path" in README
    for name in re.findall(r"^\d\. `(?:GRPOTrainer\.)?(\w+)`", README, re.M):  # the reading path names Part I's code
        assert re.search(rf"^\s*(def|class) {name}\b", PART_ONE, re.M), f"{name} is not defined in Part I"


# The names Part I uses that Part II defines: each a whole service whose call reads as a sentence (load the policy,
# choose the fast paths, the processes, the run's report, its checkpoints). A name added here is a decision.
SEAM = ["Checkpoints", "GRPOConfig", "Processes", "Recipes", "Report", "check_inputs", "load_policy", "load_rewards",
        "load_tokenizer", "make_optimizer", "trace", "use_fast_paths"]
TREE = ast.parse(GRPO_PY)
BANNER = len(PART_ONE.splitlines()) + 1  # the line of "# Part II"


def part_two_names_used_in_part_one() -> list[str]:
    late = set()
    for node in (n for n in TREE.body if n.lineno > BANNER):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            late.add(node.name)
        elif isinstance(node, ast.Assign):
            late |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return sorted({n.id for n in ast.walk(TREE) if isinstance(n, ast.Name) and n.lineno < BANNER and n.id in late})


def test_part_one_reaches_part_two_only_through_its_named_services():
    assert part_two_names_used_in_part_one() == SEAM
    assert f"reaches it through {len(SEAM)} named services" in README


def test_part_two_sets_no_attribute_of_the_trainer():
    """A service keeps its own state or is handed what it needs: no Part II code assigns to an attribute of the
    trainer (or of something the trainer holds), through `trainer` or a service's `self.trainer`."""
    def through_trainer(node) -> bool:
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
            if isinstance(node, ast.Attribute) and node.attr == "trainer":
                return True
        return isinstance(node, ast.Name) and node.id == "trainer"

    offenders = []
    for node in (n for n in ast.walk(TREE) if getattr(n, "lineno", 0) > BANNER):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for target in (t for group in targets for t in (group.elts if isinstance(group, ast.Tuple) else [group])):
            if isinstance(target, (ast.Attribute, ast.Subscript)) and through_trainer(target):
                offenders.append(f"line {target.lineno}: {ast.unparse(target)}")
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setattr" and through_trainer(
                ast.Attribute(value=node.args[0], attr="x")):
            offenders.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


def test_part_one_holds_the_algorithm_and_its_loop_has_the_algorithms_shape():
    """Every function that computes a number GRPO's advantages or loss depend on is defined in Part I, in the order
    the data flows; train is the nested loops of the algorithm, with resume and ranks behind batches_left."""
    defined = re.findall(r"^(?:def|class) (\w+)", PART_ONE, re.M)
    order = ["AlgorithmConfig", "RepeatSampler", "GenerationBatch", "tokenize_prompts", "sample_with_cache",
             "completion_mask_from_eos", "decode", "compute_rewards", "weighted_rewards", "nanstd", "group_advantages",
             "selective_log_softmax", "get_per_token_logps", "masked_mean", "grpo_loss", "GRPOTrainer"]
    assert [name for name in defined if name in order] == order
    # GRPO alone: TRL's other recipes open Part II (section 11), reached through one service, Recipes
    assert len(PART_ONE.splitlines()) <= 885, f"Part I is {len(PART_ONE.splitlines())} lines"
    recipes = re.search(r"^# -+\n# 11\..*?(?=^# -+\n# 12\.)", GRPO_PY, re.M | re.S).group(0)
    assert len(recipes.splitlines()) <= 172, f"section 11 is {len(recipes.splitlines())} lines"
    assert len(GRPO_PY.splitlines()) <= 3738, "grpo.py is over 3,738 lines: it grows only on purpose"
    train = inspect.getsource(grpo.GRPOTrainer.train)
    assert len(train.splitlines()) <= 25 and "continue" not in train
    loops = [line.strip() for line in train.splitlines() if line.strip().startswith("for ")]
    assert [re.split(r"[(:]", loop.split(" in ")[1])[0] for loop in loops] == [
        "self.checkpoints.batches_left", "range", "micro_batches"]
