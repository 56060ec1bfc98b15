"""Knowledge distillation (trainer/kd.py): the loss against hand-computed values, a student pulled toward its
teacher, the tokenizer check, and the stages with --teacher."""

import json
import math

import pytest
import torch

from dataset.chat import IGNORE_INDEX
from model import LM, LMConfig
from tests.conftest import CHAT_TINY, pretrain_args, run_script
from trainer.kd import kd_loss


def softmax(xs: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(x / t) for x in xs]
    return [e / sum(exps) for e in exps]


def test_kd_loss_by_hand():
    student = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]]])
    teacher = torch.tensor([[[2.0, 0.0, 1.0], [1.0, -1.0, 2.0], [0.0, 5.0, 0.0]]])
    labels = torch.tensor([[1, 2, IGNORE_INDEX]])  # the third position counts for nothing
    alpha, t = 0.3, 2.0

    ce = (-math.log(softmax([1.0, 2.0, 0.5])[1]) - math.log(softmax([0.0, 0.0, 3.0])[2])) / 2

    def kl(p_logits, q_logits):  # KL(p_T || q_T)
        p, q = softmax(p_logits, t), softmax(q_logits, t)
        return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))

    kl_mean = (kl([2.0, 0.0, 1.0], [1.0, 2.0, 0.5]) + kl([1.0, -1.0, 2.0], [0.0, 0.0, 3.0])) / 2
    loss, got_ce, got_kl = kd_loss(student, teacher, labels, alpha, t)
    assert got_ce.item() == pytest.approx(ce, abs=1e-6)
    assert got_kl.item() == pytest.approx(kl_mean, abs=1e-6)
    assert loss.item() == pytest.approx((1 - alpha) * ce + alpha * t**2 * kl_mean, abs=1e-6)

    # Top-2 of the teacher, the third token lumped into "the rest", for both models: KL over 3 outcomes. With 3 tokens
    # that is the full KL again, so use a 4-token vocabulary here.
    s4 = torch.tensor([[[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]]])
    t4 = torch.tensor([[[2.0, 0.0, 1.0, 0.5], [1.0, -1.0, 2.0, -2.0]]])
    labels4 = torch.tensor([[1, 2]])

    def kl_top2(p_logits, q_logits):
        keep = sorted(range(4), key=lambda i: -p_logits[i])[:2]
        p, q = softmax(p_logits, t), softmax(q_logits, t)
        lumped_p = [p[i] for i in keep] + [1 - sum(p[i] for i in keep)]
        lumped_q = [q[i] for i in keep] + [1 - sum(q[i] for i in keep)]
        return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(lumped_p, lumped_q))

    def kl_full(p_logits, q_logits):
        p, q = softmax(p_logits, t), softmax(q_logits, t)
        return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))

    rows = [([2.0, 0.0, 1.0, 0.5], [1.0, 2.0, 0.5, -1.0]), ([1.0, -1.0, 2.0, -2.0], [0.0, 0.0, 3.0, 1.0])]
    top2 = sum(kl_top2(teacher_row, student_row) for teacher_row, student_row in rows) / 2
    full = sum(kl_full(teacher_row, student_row) for teacher_row, student_row in rows) / 2
    ce4 = (-math.log(softmax([1.0, 2.0, 0.5, -1.0])[1]) - math.log(softmax([0.0, 0.0, 3.0, 1.0])[2])) / 2
    loss, _, got_kl = kd_loss(s4, t4, labels4, alpha, t, topk=2)
    assert got_kl.item() == pytest.approx(top2, abs=1e-6)
    assert 0 < top2 < full  # lumping outcomes can only lose divergence
    assert loss.item() == pytest.approx((1 - alpha) * ce4 + alpha * t**2 * top2, abs=1e-6)
    assert kd_loss(s4, s4, labels4, 1.0, t, topk=2)[0].item() == pytest.approx(0.0, abs=1e-6)  # student = teacher

    # alpha 0 is plain cross-entropy; a teacher equal to the student adds nothing; all of the vocabulary is top-k 3.
    assert kd_loss(student, teacher, labels, 0.0, t)[0].item() == pytest.approx(ce, abs=1e-6)
    assert kd_loss(student, student, labels, 1.0, t)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(student, teacher, labels, alpha, t, topk=3)[2].item() == pytest.approx(kl_mean, abs=1e-6)


def test_distillation_moves_the_students_distribution_to_the_teachers():
    """alpha 1 (KL only) on a fixture batch: KL(teacher || student) falls at least 5x in 40 steps (measured:
    4.60 -> 0.19, 24x), the student never seeing a label."""
    torch.manual_seed(0)
    config = LMConfig.from_preset("tiny", vocab_size=256)
    student = LM(config)
    torch.manual_seed(1)
    teacher = LM(config).eval().requires_grad_(False)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(30)  # a confident teacher: far from the near-uniform student
    ids = torch.randint(3, 256, (2, 32))
    labels = ids[:, 1:]
    with torch.no_grad():
        teacher_logits = teacher(ids).logits[:, :-1]

    def kl() -> float:
        with torch.no_grad():
            return kd_loss(student(ids).logits[:, :-1], teacher_logits, labels, 1.0, 1.0)[2].item()

    before = kl()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for _ in range(40):
        loss, _, _ = kd_loss(student(ids).logits[:, :-1], teacher_logits, labels, 1.0, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = kl()
    assert before > 1.0
    assert after < before / 5, (before, after)


def other_teacher(tmp_path, tokenizer_dir, vocab_size: int, tokenizer_from=None):
    """A tiny checkpoint with `vocab_size` rows, with the tokenizer files of `tokenizer_from` (none if None)."""
    from dataset.tokenizer import load_tokenizer, save_tokenizer

    LM(LMConfig.from_preset("tiny", vocab_size=vocab_size)).save_pretrained(tmp_path)
    if tokenizer_from is not None:
        save_tokenizer(load_tokenizer(tokenizer_from), tmp_path)
    return tmp_path


@pytest.mark.slow
def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, tokenizer_dir, chat_checkpoint):
    chats = chat_checkpoint["chats"]
    student = chat_checkpoint["model"]
    args = ["--init_from", student, "--data_path", chats, "--out_dir", tmp_path / "out", *CHAT_TINY]

    bigger_vocab = other_teacher(tmp_path / "v1000", tokenizer_dir, 1000)
    result = run_script("train_sft.py", *args, "--teacher", bigger_vocab, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "vocab_size 1000" in result.stderr and "must use the student's tokenizer" in result.stderr
    assert "Traceback" not in result.stderr

    # Same size, other tokens: a tokenizer trained on other text (here: the test tokenizer with two ids swapped).
    from dataset.tokenizer import load_tokenizer

    vocab_size = LM.from_pretrained(student).config.vocab_size
    teacher = other_teacher(tmp_path / "swapped", tokenizer_dir, vocab_size, tokenizer_from=tokenizer_dir)
    tok = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (teacher / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    assert load_tokenizer(teacher).get_vocab() != load_tokenizer(tokenizer_dir).get_vocab()
    result = run_script("train_sft.py", *args, "--teacher", teacher, check=False)
    assert result.returncode == 2 and "its tokenizer differs" in result.stderr, result.stderr[-2000:]

    result = run_script("train_sft.py", *args, "--teacher", tmp_path / "nowhere", check=False)
    assert result.returncode == 2 and "--teacher" in result.stderr and "does not exist" in result.stderr

    # KD scores the answers only: a prompt loss weight with it is refused in one line, not silently dropped.
    result = run_script("train_sft.py", *args, "--teacher", student, "--prompt_loss_weight", "0.1", check=False)
    assert result.returncode == 2 and "takes no --prompt_loss_weight" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sft_and_pretrain_with_a_teacher(tmp_path, corpus, tokenizer_dir, chat_checkpoint):
    """--teacher on a chat stage and on pretraining: CE and KL logged apart; validation reports the student's CE."""
    out = tmp_path / "sft"
    run_script("train_sft.py", "--init_from", chat_checkpoint["model"], "--data_path", chat_checkpoint["chats"],
               "--val_data_path", chat_checkpoint["chats"], "--out_dir", out, "--teacher", chat_checkpoint["model"],
               "--kd_alpha", "0.5", "--kd_temperature", "2", "--kd_topk", "8", *CHAT_TINY)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r and "ce" in r]
    assert train_rows and all("kl" in r for r in train_rows)
    # The teacher is the student's own start: the first step's KL (top-8 and the rest) is 0, loss = 0.5 * CE + 2 * KL.
    first = train_rows[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss"] == pytest.approx(0.5 * first["ce"] + 2 * first["kl"], rel=1e-3)
    val = [r for r in rows if "val_loss" in r][-1]
    assert val["val_loss"] == pytest.approx(val["val_ce"], rel=1e-6) and "val_kl" in val

    teacher = tmp_path / "pretrain_teacher"
    run_script("train_pretrain.py", *pretrain_args(corpus, tokenizer_dir, teacher, "--max_steps", "2"))
    student = tmp_path / "pretrain_student"
    run_script("train_pretrain.py", *pretrain_args(corpus, tokenizer_dir, student, "--max_steps", "2",
                                                   "--hidden_size", "32", "--teacher", teacher, "--kd_alpha", "1"))
    rows = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    kd_rows = [r for r in rows if "loss" in r and "kl" in r and "ce" in r]
    # Another model as the teacher: a KL above 0, and at --kd_alpha 1 the loss is T^2 * KL alone (T = 2).
    assert kd_rows and all(r["kl"] > 1e-4 and r["loss"] == pytest.approx(4 * r["kl"], rel=1e-3) for r in kd_rows)
