"""Mixing sources by weight (dataset/mixing.py): parsing `--data_path a:0.7,b:0.3`, the counts, and every dataset
drawing each source at its weight."""

import numpy as np
import pytest

from dataset.bins import prepare_bins
from dataset.chat import load_tokenizer
from dataset.errors import UsageError
from dataset.lm_dataset import DPODataset, PretrainDataset, RLPromptDataset, SFTDataset
from dataset.mixing import mix_counts, mix_indices, parse_data_path
from tests.conftest import write_jsonl


def test_parse_weights_and_plain_lists(tmp_path):
    assert parse_data_path("a.jsonl:0.7, b.jsonl:0.3") == [("a.jsonl", 0.7), ("b.jsonl", 0.3)]
    assert parse_data_path("a.jsonl,b.jsonl") == [("a.jsonl", None), ("b.jsonl", None)]
    assert parse_data_path("data/x.parquet:2") == [("data/x.parquet", 2.0)]
    odd = tmp_path / "odd.jsonl:1"  # a file whose name ends like a weight is a file
    odd.write_text("")
    assert parse_data_path(str(odd)) == [(str(odd), None)]
    with pytest.raises(UsageError, match="give every file a weight"):
        parse_data_path("a.jsonl:0.7,b.jsonl")
    with pytest.raises(UsageError, match="positive"):
        parse_data_path("a.jsonl:0,b.jsonl:1")
    real = tmp_path / "real.jsonl"
    real.write_text("")
    for bad in ("-1", "abc"):  # an existing file with a suffix no weight reads: the weight is named, not "no such file"
        with pytest.raises(UsageError, match=f"a weight must be a positive number, got '{bad}'"):
            parse_data_path(f"{real}:{bad}")


def test_counts_add_up_and_follow_the_weights():
    assert mix_counts([100, 100], [0.7, 0.3]) == [140, 60]
    assert mix_counts([10, 1000], [1, 1]) == [505, 505]  # the small source repeats, the large one is subsampled
    assert sum(mix_counts([7, 11, 13], [0.5, 0.3, 0.2])) == 31
    sources, items = mix_indices([10, 1000], [1, 1], seed=0)
    small = items[sources == 0]
    assert np.bincount(small, minlength=10).min() == 50  # every item of the small source, 50 or 51 times
    large = items[sources == 1]
    assert len(set(large.tolist())) == len(large) == 505  # a subset of distinct items
    assert not np.array_equal(sources, np.sort(sources))  # interleaved, not one source after the other
    again = mix_indices([10, 1000], [1, 1], seed=0)
    assert np.array_equal(again[0], sources) and np.array_equal(again[1], items)


def source_share(parts: np.ndarray, n_sources: int) -> np.ndarray:
    return np.bincount(parts, minlength=n_sources) / len(parts)


def test_pretraining_windows_are_drawn_by_weight(tmp_path, tokenizer_dir):
    texts = {"a": "甲乙丙丁，春夏秋冬。", "b": "one two three four. ", "c": "1234567890"}
    bins = []
    for name, text in texts.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": text[i % 7:] * (5 + i % 11)} for i in range(77)])
        bins.append(prepare_bins(str(path), str(tokenizer_dir), str(tmp_path / "bins"), quiet=True)["bin_path"])
    weights = [0.5, 0.3, 0.2]
    data = PretrainDataset(bins, 16, weights=weights, seed=1)
    tokens = [np.fromfile(b, dtype=np.uint16) for b in bins]
    for i in range(len(data)):  # each item is the window the mix says, of the file it says
        part, window = data.mixed[0][i], data.mixed[1][i]
        assert data[i]["input_ids"].tolist() == tokens[part][window * 16:window * 16 + 16].tolist()
    share, n = source_share(data.mixed[0], 3), len(data)
    assert np.allclose(share, weights, atol=1 / n)
    assert len(data) == len(PretrainDataset(bins, 16))  # an epoch is as long as all windows together


def test_chat_stages_draw_each_source_at_its_weight(tmp_path, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    sources = []
    for name, n in (("a", 90), ("b", 40), ("c", 200)):
        chats = [{"conversations": [{"role": "user", "content": f"{name}{i}"},
                                    {"role": "assistant", "content": f"{name}答{i}"}]} for i in range(n)]
        sources.append(str(write_jsonl(tmp_path / f"{name}.jsonl", chats)))
    weights = [0.2, 0.5, 0.3]
    spec = ",".join(f"{p}:{w}" for p, w in zip(sources, weights))
    sft = SFTDataset(spec, tokenizer, 64, quiet=True, cache_dir=tmp_path / "cache")
    assert sft.stats["conversations"] == 330
    assert np.allclose(source_share(sft.item_part, 3), weights, atol=1 / 330)
    # The rows hold exactly the drawn conversations: count them by their text.
    seen = {"a": 0, "b": 0, "c": 0}
    for i in range(len(sft)):
        item = sft[i]
        for segment in range(1, int(item["segment_ids"].max()) + 1):
            text = tokenizer.decode(item["input_ids"][item["segment_ids"] == segment].tolist())
            seen[text.split("user\n")[1][0]] += 1
    assert [seen[k] for k in "abc"] == np.bincount(sft.item_part, minlength=3).tolist() == [66, 165, 99]
    plain = SFTDataset(",".join(sources), tokenizer, 64, quiet=True, cache_dir=tmp_path / "cache")
    assert plain.stats["conversations"] == 330 and plain.weights is None  # a plain list: one after the other

    pairs = []
    for name, n in (("a", 30), ("b", 90)):
        records = [{"prompt": f"{name}{i}", "chosen": "好", "rejected": "差"} for i in range(n)]
        pairs.append(str(write_jsonl(tmp_path / f"{name}_pairs.jsonl", records)))
    dpo = DPODataset(f"{pairs[0]}:3,{pairs[1]}:1", tokenizer, 64, quiet=True, cache_dir=tmp_path / "cache")
    assert len(dpo) == 120 and np.bincount(dpo.item_part).tolist() == [90, 30]
    first_chars = [tokenizer.decode(dpo[i]["chosen_ids"].tolist()).split("user\n")[1][0] for i in range(len(dpo))]
    assert first_chars.count("a") == 90
    rl = RLPromptDataset(f"{pairs[0]}:1,{pairs[1]}:1", tokenizer, quiet=True, cache_dir=tmp_path / "cache")
    assert np.bincount(rl.item_part).tolist() == [60, 60]
