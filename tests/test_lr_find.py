"""trainer/lr_find.py (--lr_find): the geometric sweep, the suggestion on curves whose answer is known, and the range
test end to end on a tiny pretraining run: a plot and the points, a suggestion printed, no checkpoint."""

import json
import math

import pytest

from dataset.errors import UsageError
from tests.conftest import pretrain_args, run_script
from trainer.lr_find import LR_END, LR_START, smooth, suggest, sweep_lrs


def test_sweep_is_geometric_between_the_ends():
    lrs = sweep_lrs(61)
    assert lrs[0] == pytest.approx(LR_START) and lrs[-1] == pytest.approx(LR_END)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios))
    with pytest.raises(UsageError, match="at least 2"):
        sweep_lrs(1)


def test_smoothing_keeps_a_flat_start_flat():
    assert smooth([5.0] * 10) == pytest.approx([5.0] * 10)


def test_suggestion_is_the_steepest_fall_before_the_minimum():
    lrs = sweep_lrs(100)
    # Flat at 8 up to 1e-4, falling fastest (in log lr) at 1e-3, lowest at 1e-2, then blowing up.
    losses = [8 - 4 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + (50 * (lr - 1e-2) if lr > 1e-2 else 0) for lr in lrs]
    found = suggest(lrs, losses)
    lowest = lrs[losses.index(min(losses))]  # 1e-2, a kink that smoothing rounds off a little early
    assert 1e-3 / 1.5 < found["steepest"] < 1e-3 * 1.5  # no lag: the smoothing is centred
    assert lowest / 2.5 < found["min"] <= lowest and found["min_10"] == pytest.approx(found["min"] / 10)
    rising = [1.0 + i for i in range(20)]  # the minimum at the start: nothing to descend
    assert suggest(sweep_lrs(20), rising)["steepest"] == suggest(sweep_lrs(20), rising)["min_10"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_lr_find_plots_suggests_and_writes_no_checkpoint(corpus, tokenizer_dir, tmp_path, optimizer):
    out = tmp_path / "lr_find"
    result = run_script("train_pretrain.py", *pretrain_args(corpus, tokenizer_dir, out, "--lr_find",
                                                            "--lr_find_steps", "40", "--optimizer", optimizer))
    assert "lr_find: suggested --learning_rate" in result.stdout and "no checkpoint written" in result.stdout
    assert (out / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    found = json.loads((out / "lr_find.json").read_text())
    assert found["optimizer"] == optimizer and 2 <= found["steps"] <= 40
    assert len(found["lrs"]) == len(found["losses"]) == found["steps"]
    assert LR_START <= found["suggestion"] <= LR_END
    assert found["losses"][0] > min(found["losses"])  # the sweep got somewhere before it stopped
    assert not (out / "model.safetensors").exists() and not (out / "train_state").exists()
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text()
