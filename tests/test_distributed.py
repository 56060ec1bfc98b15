"""torchrun on CPU (gloo): 2 ranks x batch b follow the loss trajectory of 1 rank x batch 2b."""

import json
import subprocess
import sys

from tests.conftest import REPO, run_script
from tests.test_pretrain import pretrain_args


def losses(out_dir) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_ranks_match_one_rank_with_double_batch(tmp_path, corpus, tokenizer_dir):
    common = ["--max_steps", "10", "--log_every", "1", "--eval_every", "0", "--sample_every", "0",
              "--save_every", "0", "--seed", "3"]
    single = tmp_path / "single"
    args = pretrain_args(corpus, tokenizer_dir, single, *common)
    args[args.index("--batch_size") + 1] = "8"
    run_script("train_pretrain.py", *args)

    double = tmp_path / "ddp"
    args = pretrain_args(corpus, tokenizer_dir, double, *common)  # batch_size 4 per rank
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29517", "train_pretrain.py", *map(str, args)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es)" in result.stdout

    a, b = losses(single), losses(double)
    assert len(a) == len(b) == 10
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3, (a, b)
    assert a[-1] < a[0]
