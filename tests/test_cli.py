"""The shared command line: --dtype spellings, per-stage defaults from trainer/stages.py."""

import pytest

from trainer.cli import parse_args
from trainer.config import TrainConfig
from trainer.stages import STAGES


@pytest.mark.parametrize("spelling,name", [("float32", "fp32"), ("fp32", "fp32"), ("bfloat16", "bf16"),
                                           ("BF16", "bf16"), ("float16", "fp16"), ("auto", "auto")])
def test_dtype_accepts_torch_and_transformers_spellings(spelling, name):
    args = parse_args("pretrain", {"data_path": "x.jsonl", "val_data_path": None}, argv=["--dtype", spelling])
    assert args.dtype == name


def test_unknown_dtype_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args("pretrain", {"data_path": "x.jsonl"}, argv=["--dtype", "int8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'int8' is not a precision" in err and "bfloat16" in err


def test_stage_defaults_come_from_the_stages_table(tmp_path, monkeypatch):
    """Each stage writes to its own out_dir and starts from the previous stage's, as trainer/stages.py says."""
    monkeypatch.chdir(tmp_path)
    for name in ("sft", "lora", "dpo", "distill"):
        stage = STAGES[name]
        (tmp_path / stage.init_from).mkdir(parents=True, exist_ok=True)
        (tmp_path / stage.init_from / "config.json").write_text("{}")
        args = parse_args(name, {"data_path": "x.jsonl"}, argv=[])
        assert (args.out_dir, args.init_from, args.tokenizer_dir) == (stage.out_dir, stage.init_from, stage.init_from)
        assert TrainConfig.from_args(args).out_dir == stage.out_dir
