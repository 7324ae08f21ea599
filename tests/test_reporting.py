"""--report_to (TensorBoard, wandb, trackio; each read back offline) and output_dir/metrics.png."""

import glob
import json
import os
import struct
import sys

import pytest

import grpo
from grpo import GRPOTrainer
from test_trainer import letters_data, read_metrics, small_args


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])  # the IHDR chunk: width, height


def wandb_history(path) -> dict[int, dict]:
    """The rows that wandb.log wrote to an offline run's .wandb file, by step. The file is a LevelDB-style
    log after a 7-byte header: 32 KiB blocks of records, each a 7-byte header (crc32, length, kind) and a
    piece of one serialized Record; kind 1 is a whole record, 2-4 its first, middle and last pieces."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    rows, position, pending = {}, 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows[record.history.step.num] = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                                 for item in record.history.item}
    return rows


def test_every_tracker_gets_the_rows_of_metrics_jsonl_and_the_completions_table(tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    trackio = pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_PROJECT", "grpo-test")
    args = small_args(tmp_path, max_steps=2, beta=0.04, log_completions=True, eval_strategy="steps", eval_steps=2,
                      eval_on_start=True,
                      report_to=["tensorboard", "wandb", "trackio"])
    trainer = GRPOTrainer(tiny_model_dir, "letters", args=args, train_dataset=letters_data(),
                          eval_dataset=letters_data(8))
    trainer.train()
    rows = read_metrics(args)
    assert [r["step"] for r in rows] == [0, 1, 2]
    trained = {r["step"]: r for r in rows if "reward" in r}
    evaluated = {r["step"]: r for r in rows if "eval_reward" in r}
    assert sorted(trained) == [1, 2] and sorted(evaluated) == [0, 2]

    # TensorBoard: the event file under output_dir/runs, read back with TensorBoard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(args.output_dir, "runs"), size_guidance={"tensors": 0}).Reload()
    for name, key, expected in (("train/reward", "reward", trained), ("train/kl", "kl", trained),
                                ("eval/reward", "eval_reward", evaluated)):
        points = {e.step: e.value for e in events.Scalars(name)}  # stored as float32
        assert points == pytest.approx({step: r[key] for step, r in expected.items()}, rel=1e-6), name
    table = events.Tensors("completions/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert table.splitlines()[0] == "step | prompt | completion | letters_reward | advantage"
    assert len(table.splitlines()) == 2 + args.generation_batch_size  # header, rule, one line per completion

    # wandb, offline: the run's log file, read record by record, and the completions table it saved.
    (run_dir,) = glob.glob(os.path.join(args.output_dir, "wandb", "offline-run-*"))
    (log_file,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    history = wandb_history(log_file)
    assert {step: h["train/reward"] for step, h in history.items() if "train/reward" in h} == pytest.approx(
        {step: r["reward"] for step, r in trained.items()})
    assert {step: h["eval/reward"] for step, h in history.items() if "eval/reward" in h} == pytest.approx(
        {step: r["eval_reward"] for step, r in evaluated.items()})
    assert history[2]["completions/nrows"] == args.generation_batch_size
    for path in glob.glob(os.path.join(run_dir, "files", "media", "table", "completions_*.table.json")):
        with open(path) as f:
            saved = json.load(f)
        assert saved["columns"] == ["step", "prompt", "completion", "letters_reward", "advantage"]
        assert len(saved["data"]) == args.generation_batch_size

    # trackio: its local database, read back through its own storage API.
    storage = trackio.SQLiteStorage
    (run,) = storage.get_runs("grpo-test")
    logged = storage.get_logs("grpo-test", run)
    reward = {r["step"]: r["train/reward"] for r in logged if r.get("train/reward") is not None}
    assert reward == pytest.approx({step: r["reward"] for step, r in trained.items()})


def test_a_missing_tracker_fails_in_one_line_before_any_work(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(SystemExit) as stop:
        grpo.main(["--model_name_or_path", tiny_model_dir, "--dataset_name", "data/letters_chat.jsonl",
                   "--reward_funcs", "letters", "--report_to", "wandb", "--output_dir", str(tmp_path / "out")])
    assert str(stop.value) == "error: --report_to wandb needs the wandb package: pip install wandb"
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")
    with pytest.raises(ValueError, match="Unknown report_to tensorbord; choose from none, tensorboard, wandb"):
        grpo.GRPOConfig(report_to="tensorbord")


def test_metrics_png_has_a_panel_per_logged_curve(tmp_path):
    rows = [{"step": 0, "eval_reward": -1.0}, {"step": 1, "reward": -2.0, "completions/mean_length": 7.0},
            {"step": 2, "reward": 0.5, "completions/mean_length": 5.0, "eval_reward": 1.0}]
    two = str(tmp_path / "two.png")
    assert grpo.plot_metrics(rows, two) and png_size(two) == (900, 340)  # β = 0: no KL, so reward and length
    three = str(tmp_path / "three.png")
    assert grpo.plot_metrics([{**r, "kl": 0.01} for r in rows[1:]], three) and png_size(three) == (1350, 340)
    assert sorted(os.listdir(tmp_path)) == ["three.png", "two.png"]  # no temporary file left behind


def test_without_matplotlib_the_picture_is_skipped_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not grpo.plot_metrics([{"step": 1, "reward": 1.0}], str(tmp_path / "metrics.png"))
    assert capsys.readouterr().out == "[grpo] metrics.png skipped: it needs matplotlib (pip install matplotlib).\n"
    assert not os.listdir(tmp_path)
