"""The pretraining data path: JSONL -> uint16 token bins -> packed windows."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import dataset.bins as token_bins
from dataset.bins import prepare_bins
from dataset.errors import DataError
from dataset.lm_dataset import PretrainDataset

REPO = Path(__file__).resolve().parents[1]
MINIMIND = REPO.parent / "shared" / "fixtures" / "minimind"
EOT = "<|endoftext|>"


def make_tokenizer(directory: Path, vocab_size: int = 300, special: tuple[str, ...] = (EOT,)) -> Path:
    """A tiny byte-level BPE tokenizer, so these tests depend on nothing but the tokenizers library."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello world, the cat sat on the mat. 你好世界"] * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def write_docs(path: Path, docs: list) -> str:
    path.write_text("".join(json.dumps(d if isinstance(d, dict) else {"text": d}, ensure_ascii=False) + "\n"
                            for d in docs))
    return str(path)


def decode_bin(index: dict, tokenizer_dir: Path) -> str:
    ids = np.fromfile(index["bin_path"], dtype=np.uint16)
    assert len(ids) == index["n_tokens"]
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return tokenizer.decode(ids.tolist(), skip_special_tokens=False)


@pytest.fixture
def tok(tmp_path) -> Path:
    return make_tokenizer(tmp_path / "tok")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Several chunks per test file, so order across chunks and workers is exercised."""
    monkeypatch.setattr(token_bins, "LINES_PER_CHUNK", 16)


DOCS = [f"doc {i}: the cat sat on the mat {i * 7} times. 你好 {i % 5}" for i in range(120)]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_tokens_round_trip_in_document_order(tmp_path, tok, num_workers):
    data = write_docs(tmp_path / "corpus.jsonl", DOCS)
    index = prepare_bins(data, str(tok), str(tmp_path / "bins"), num_workers=num_workers, quiet=True)
    assert decode_bin(index, tok) == "".join(doc + EOT for doc in DOCS)
    assert index["n_docs"] == len(DOCS) and index["n_duplicates"] == 0 and index["n_skipped"] == 0
    assert index["eot_id"] == Tokenizer.from_file(str(tok / "tokenizer.json")).token_to_id(EOT)
    assert Path(index["bin_path"]).name.startswith("corpus.") and index["dtype"] == "uint16"
    on_disk = json.loads(Path(index["bin_path"]).with_suffix(".json").read_text())
    assert on_disk["n_tokens"] == index["n_tokens"] and on_disk["source"] == str(Path(data).resolve())


def test_exact_duplicates_dropped_and_counted(tmp_path, tok):
    docs = DOCS[:40] + [DOCS[3], DOCS[3], DOCS[39]] + DOCS[40:50] + [DOCS[45]]  # within and across chunks
    data = write_docs(tmp_path / "dups.jsonl", docs)
    index = prepare_bins(data, str(tok), str(tmp_path / "bins"), num_workers=2, quiet=True)
    assert index["n_duplicates"] == 4 and index["n_docs"] == 50
    assert decode_bin(index, tok) == "".join(doc + EOT for doc in DOCS[:50])


def test_cache_reused_then_invalidated_by_tokenizer_and_source_changes(tmp_path, tok, capsys):
    data = write_docs(tmp_path / "c.jsonl", DOCS[:30])
    bins = str(tmp_path / "bins")
    first = prepare_bins(data, str(tok), bins, num_workers=1)
    mtime = Path(first["bin_path"]).stat().st_mtime_ns
    capsys.readouterr()

    again = prepare_bins(data, str(tok), bins, num_workers=1)
    assert "cached" in capsys.readouterr().out
    assert again == first and Path(first["bin_path"]).stat().st_mtime_ns == mtime

    make_tokenizer(tok, vocab_size=280)  # same directory, different tokenizer.json
    retokenized = prepare_bins(data, str(tok), bins, num_workers=1)
    assert "cached" not in capsys.readouterr().out
    assert retokenized["tokenizer_hash"] != first["tokenizer_hash"]
    assert retokenized["bin_path"] != first["bin_path"]
    assert decode_bin(retokenized, tok) == "".join(doc + EOT for doc in DOCS[:30])

    write_docs(tmp_path / "c.jsonl", DOCS[:31])  # the source grows: same paths, fresh tokens
    grown = prepare_bins(data, str(tok), bins, num_workers=1)
    assert "cached" not in capsys.readouterr().out
    assert grown["bin_path"] == retokenized["bin_path"] and grown["n_docs"] == 31


def test_bad_line_names_file_and_line_from_a_worker(tmp_path, tok):
    docs = DOCS[:40] + [{"text": 123}] + DOCS[40:60]  # line 41, in the third chunk
    data = write_docs(tmp_path / "bad.jsonl", docs)
    with pytest.raises(DataError) as info:
        prepare_bins(data, str(tok), str(tmp_path / "bins"), num_workers=2, quiet=True)
    assert str(info.value) == f"{data}:41: field 'text' must be a string, got int"
    assert not list((tmp_path / "bins").glob("*")), "a failed run must leave no bin or index behind"


def test_skip_bad_counts_and_keeps_good_documents(tmp_path, tok):
    data = tmp_path / "mixed.jsonl"
    write_docs(data, DOCS[:20] + [{"txt": "x"}, {"text": ""}] + DOCS[20:25])
    with open(data, "ab") as f:
        f.write(b"{broken\n\xff\n")
    index = prepare_bins(str(data), str(tok), str(tmp_path / "bins"), num_workers=2, skip_bad=True, quiet=True)
    assert index["n_skipped"] == 4 and index["n_docs"] == 25
    assert decode_bin(index, tok) == "".join(doc + EOT for doc in DOCS[:25])


def test_tokenizer_without_eot_is_refused(tmp_path):
    tok = make_tokenizer(tmp_path / "no_eot", special=("<unk>",))
    data = write_docs(tmp_path / "d.jsonl", DOCS[:3])
    with pytest.raises(ValueError, match=re.escape(EOT)):
        prepare_bins(data, str(tok), str(tmp_path / "bins"), quiet=True)


def test_minimind_tokenizer_on_the_pretrain_fixture(tmp_path):
    fixture = REPO.parent / "shared" / "fixtures" / "formats" / "pretrain_text.jsonl"
    if not (MINIMIND / "tokenizer.json").is_file() or not fixture.is_file():
        pytest.skip("shared fixtures absent")
    texts = [json.loads(line)["text"] for line in fixture.read_text().splitlines() if line.strip()]
    index = prepare_bins(str(fixture), str(MINIMIND), str(tmp_path / "bins"), num_workers=1, quiet=True)
    assert decode_bin(index, MINIMIND) == "".join(t + EOT for t in texts)


@pytest.mark.slow
def test_runs_as_a_script(tmp_path, tok):
    data = write_docs(tmp_path / "cli.jsonl", DOCS[:5])
    bins = tmp_path / "bins"
    done = subprocess.run([sys.executable, "-m", "scripts.prepare_data", "--data_path", data, "--tokenizer_dir",
                           str(tok), "--bin_dir", str(bins), "--num_workers", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "5 documents" in done.stdout
    assert len(list(bins.glob("cli.*.bin"))) == 1


# --- PretrainDataset ---------------------------------------------------------------------------------------

def test_windows_and_labels_align_with_the_bin(tmp_path, tok):
    data = write_docs(tmp_path / "w.jsonl", DOCS[:50])
    index = prepare_bins(data, str(tok), str(tmp_path / "bins"), num_workers=1, quiet=True)
    raw = np.fromfile(index["bin_path"], dtype=np.uint16).astype(np.int64)
    seq_len = 32
    dataset = PretrainDataset(index["bin_path"], seq_len)
    assert dataset.n_tokens == len(raw) == index["n_tokens"]
    assert len(dataset) == (len(raw) - 1) // seq_len
    for i in [0, 1, len(dataset) - 1]:
        item = dataset[i]
        assert item["input_ids"].dtype == item["labels"].dtype == torch.long
        assert item["input_ids"].tolist() == raw[i * seq_len : (i + 1) * seq_len].tolist()
        assert item["labels"].tolist() == raw[i * seq_len + 1 : (i + 1) * seq_len + 1].tolist()
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, seq_len)


def test_window_count_at_the_boundary(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(9, dtype=np.uint16).tofile(path)  # 9 tokens: two windows of 4 (+1 label each), no more
    dataset = PretrainDataset(str(path), 4)
    assert len(dataset) == 2
    assert dataset[1]["labels"].tolist() == [5, 6, 7, 8]
    np.arange(8, dtype=np.uint16).tofile(path)
    assert len(PretrainDataset(str(path), 4)) == 1


# --- dataset.io: the atomic writes bins, indexes and checkpoints go through ------------------------------------

def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    from dataset.io import atomic_path, atomic_write_json, atomic_write_text

    target = tmp_path / "loss.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and not tmp.exists()
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing under the real name until the block ends
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed halfway")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["loss.png"]
    atomic_write_text(tmp_path / "a.txt", "你好\n")
    atomic_write_json(tmp_path / "b.json", {"k": "值"})
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "你好\n"
    assert json.loads((tmp_path / "b.json").read_text(encoding="utf-8")) == {"k": "值"}
    assert "值" in (tmp_path / "b.json").read_text(encoding="utf-8")
