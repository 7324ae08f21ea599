"""--fsdp and fsdp_config read as transformers' TrainingArguments reads them, and what they refuse, in one process
(the sharded runs themselves are in tests/test_distributed.py)."""

import json

import pytest
import torch

import grpo
from grpo import GRPOConfig


def test_fsdp_config_fills_transformers_defaults_and_reads_its_spellings(tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path), fsdp=True)
    assert args.fsdp is True and args.fsdp_config == grpo.FSDP_DEFAULTS
    assert GRPOConfig(output_dir=str(tmp_path)).fsdp is False
    # the fsdp_ prefix transformers also accepts, JSON text, a JSON file, a class name alone
    text = GRPOConfig(output_dir=str(tmp_path), fsdp=True, fsdp_config='{"fsdp_reshard_after_forward": false}')
    assert text.fsdp_config["reshard_after_forward"] is False
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps({"activation_checkpointing": True, "transformer_layer_cls_to_wrap": "Block"}))
    from_file = GRPOConfig(output_dir=str(tmp_path), fsdp=True, fsdp_config=str(path))
    assert from_file.fsdp_config["transformer_layer_cls_to_wrap"] == "Block"  # shard() reads one name or a list
    assert from_file.gradient_checkpointing is True  # activation_checkpointing is the same recompute
    # transformers' older strings: full_shard (reshard after forward), shard_grad_op (keep), offload
    older = GRPOConfig(output_dir=str(tmp_path), fsdp="shard_grad_op offload")
    assert older.fsdp and older.fsdp_config["reshard_after_forward"] is False and older.fsdp_config["cpu_offload"]
    assert GRPOConfig(output_dir=str(tmp_path), fsdp="false").fsdp is False
    with pytest.raises(ValueError, match=r"fsdp_config must be a dict \(a JSON object\), got \[1, 2\]"):
        GRPOConfig(output_dir=str(tmp_path), fsdp=True, fsdp_config=[1, 2])


REFUSED = [  # (the command line, what its one line says)
    ("--fsdp --fsdp_config {\"version\":1}", "FSDP1 is not supported here"),
    ("--fsdp --fsdp_config {\"min_num_params\":1000}", "fsdp_config has ['min_num_params'], which this trainer"),
    ("--fsdp --fsdp_config {\"state_dict_type\":\"LOCAL_STATE_DICT\"}", "'FULL_STATE_DICT', 'SHARDED_STATE_DICT'"),
    ("--fsdp --fsdp_config {\"cpu_ram_efficient_loading\":\"yes\"}", "cpu_ram_efficient_loading is 'yes'"),
    ("--fsdp --fsdp_config {\"auto_wrap_policy\":\"SIZE_BASED_WRAP\"}", "'TRANSFORMER_BASED_WRAP', 'NO_WRAP'"),
    ("--fsdp --fsdp_config {\"cpu_offload\":\"true\"}", "cpu_offload is 'true'; it takes True, False"),
    ("--fsdp --fsdp_config {\"version\":2", "fsdp_config must be a JSON object"),
    ("--fsdp --fsdp_config no-such-file.json", "fsdp_config 'no-such-file.json' cannot be read"),
    ("--fsdp hybrid_shard", "fsdp 'hybrid_shard' is not a setting"),
    ("--fsdp --use_peft", "--fsdp with --use_peft is not supported yet"),
    ("--fsdp --cast_lm_head_to_fp32", "--fsdp with cast_lm_head_to_fp32 is not supported"),
]


@pytest.mark.parametrize("command,fragment", REFUSED, ids=[c for c, _ in REFUSED])
def test_what_fsdp_does_not_take_is_one_line_before_the_model_loads(command, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        grpo.main([*command.split(), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    assert fragment in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_model_without_decoder_layers_to_shard_names_the_knob(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))  # no _no_split_modules, and no class it could name
    args = GRPOConfig(output_dir=str(tmp_path), fsdp=True)
    with pytest.raises(ValueError, match="Set fsdp_config's transformer_layer_cls_to_wrap to the class of its decoder"):
        grpo.shard(model, args, torch.device("cpu"))
    args = GRPOConfig(output_dir=str(tmp_path), fsdp=True, fsdp_config={"transformer_layer_cls_to_wrap": "Block"})
    with pytest.raises(ValueError, match=r"Sequential has no module of the classes \['Block'\]"):  # one name, whole
        grpo.shard(model, args, torch.device("cpu"))


def test_fsdp_in_one_process_runs_unsharded_and_says_so(tmp_path, capsys, tiny_model_dir):
    args = GRPOConfig(output_dir=str(tmp_path), fsdp=True)
    model, _, _ = grpo.load_policy(tiny_model_dir, grpo.AutoTokenizer.from_pretrained(tiny_model_dir), args,
                                   torch.device("cpu"), world_size=1)
    assert not isinstance(model, grpo.FSDPModule)
    assert "this is one process, which holds it whole" in capsys.readouterr().out
