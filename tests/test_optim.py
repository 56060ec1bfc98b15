"""trainer/optim.py: --optimizer muon (Muon on the decoder layers' matrices, AdamW on the rest, one optimizer object):
the split, the learning-rate scale, a state_dict round trip that continues bitwise, a tiny model that learns, and a
pretraining run killed and resumed that ends with the weights of a run never stopped."""

import io
import shutil

import pytest
import torch
from safetensors.torch import load_file

from model import LM, LMConfig
from tests.conftest import kill_after_first_checkpoint, metric_losses, pretrain_args, run_script, torchrun
from trainer.optim import MuonAdamW, build_optimizer

CPU = torch.device("cpu")
HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_model(seed: int = 0, **shape) -> LM:
    torch.manual_seed(seed)
    return LM(LMConfig.from_preset("tiny", vocab_size=256, **shape))


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(seed))


def train_steps(model: LM, optimizer, steps: int, lr: float = 1e-3, seed: int = 1) -> list[float]:
    losses = []
    for i in range(steps):
        for group in optimizer.param_groups:  # as trainer/loop.py sets the schedule
            group["lr"] = lr
        x = batch(seed + i)
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_hidden_matrices_adamw_the_rest(tied):
    model = tiny_model(tie_word_embeddings=tied)
    optimizer = build_optimizer(model, 1e-3, 0.1, CPU, optimizer="muon", muon_lr=0.02)
    assert isinstance(optimizer, MuonAdamW) and isinstance(optimizer, torch.optim.Optimizer)
    names = {id(p): name for name, p in model.named_parameters()}
    muon = {names[id(p)] for group in optimizer.muon.param_groups for p in group["params"]}
    adamw = {names[id(p)] for group in optimizer.adamw.param_groups for p in group["params"]}
    assert muon == {n for n in names.values() if n.rsplit(".", 2)[-2] in HIDDEN}
    assert adamw == set(names.values()) - muon
    assert "model.embed_tokens.weight" in adamw and "model.norm.weight" in adamw
    assert ("lm_head.weight" in adamw) == (not tied)
    assert optimizer.param_groups[0]["lr_scale"] == pytest.approx(20.0)
    assert [g["weight_decay"] for g in optimizer.adamw.param_groups] == [0.1, 0.0]  # norms do not decay
    assert type(build_optimizer(model, 1e-3, 0.1, CPU)) is torch.optim.AdamW  # the default is unchanged
    with pytest.raises(ValueError, match="choose one of adamw, muon"):
        build_optimizer(model, 1e-3, 0.1, CPU, optimizer="sgd")


def test_muon_matrices_step_at_the_scaled_rate():
    model = tiny_model()
    optimizer = build_optimizer(model, 1e-3, 0.0, CPU, optimizer="muon", muon_lr=0.02)
    q = model.model.layers[0].self_attn.q_proj.weight  # square: Muon's "original" adjustment leaves the rate as is
    before = q.detach().clone()
    train_steps(model, optimizer, 1, lr=5e-4)  # half the peak: the Muon rate is 0.01
    update = q.detach() - before
    # An orthogonalised update: its singular values are all near 1 (Newton-Schulz in bf16 puts them in ~0.5-1.5), so
    # its RMS is ~ lr / sqrt(rows) per entry: 0.01 / 8 here.
    assert update.pow(2).mean().sqrt().item() == pytest.approx(0.01 / 8, rel=0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4] * 3  # the schedule's value, restored after the step


def test_state_dict_round_trip_continues_bitwise():
    model = tiny_model()
    optimizer = build_optimizer(model, 1e-3, 0.1, CPU, optimizer="muon")
    train_steps(model, optimizer, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert len(saved["optimizer"]["state"]) == len(list(model.parameters()))  # every parameter's state, both halves

    copy = tiny_model(seed=5)
    copy_optimizer = build_optimizer(copy, 1e-3, 0.1, CPU, optimizer="muon")
    copy.load_state_dict(saved["model"])
    copy_optimizer.load_state_dict(saved["optimizer"])
    assert copy_optimizer.muon.state is copy_optimizer.state and copy_optimizer.adamw.state is copy_optimizer.state
    assert copy_optimizer.muon.param_groups[0] is copy_optimizer.param_groups[0]
    train_steps(model, optimizer, 2, seed=10)
    train_steps(copy, copy_optimizer, 2, seed=10)
    for (name, a), b in zip(model.state_dict().items(), copy.state_dict().values()):
        assert torch.equal(a, b), name


def test_muon_trains_a_tiny_model():
    model = tiny_model()
    optimizer = build_optimizer(model, 3e-3, 0.0, CPU, optimizer="muon", muon_lr=0.02)
    x = batch()
    losses = []
    for _ in range(40):  # one batch again and again: the loss must fall far
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_pretrain_with_muon_resumes_bitwise_after_kill(corpus, tokenizer_dir, tmp_path):
    args = pretrain_args(corpus, tokenizer_dir, tmp_path / "unused", "--max_steps", "24", "--save_every", "3",
                         "--optimizer", "muon", "--log_every", "1", "--eval_every", "0", "--sample_every", "0")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_script("train_pretrain.py", *args, "--out_dir", straight)
    saved = kill_after_first_checkpoint("train_pretrain.py", *args, "--out_dir", killed, out_dir=killed)
    assert saved and saved[-1] != "step_00000024", "the run finished before it could be killed"
    result = run_script("train_pretrain.py", *args, "--out_dir", killed, "--resume")
    assert f"at step {int(saved[-1][5:])}" in result.stdout
    assert metric_losses(killed)[-1] == metric_losses(straight)[-1]
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(sorted((killed / "train_state").glob("step_*"))[-1] / "optimizer.pt", weights_only=False)
    assert "lr_scale" in state["optimizer"]["param_groups"][0]  # the Muon group was saved and restored


@pytest.mark.slow
def test_muon_under_fsdp_trains_as_one_process_and_resumes(corpus, tokenizer_dir, tmp_path):
    """Muon's Newton-Schulz on sharded (DTensor) matrices: 2 FSDP ranks x batch 2 follow 1 process x batch 4, and a
    run resumed from a sharded train state follows the one never stopped."""
    args = pretrain_args(corpus, tokenizer_dir, tmp_path / "unused", "--max_steps", "6", "--save_every", "3",
                         "--optimizer", "muon", "--log_every", "1", "--eval_every", "0", "--sample_every", "0")
    run_script("train_pretrain.py", *args, "--batch_size", "4", "--out_dir", tmp_path / "single")
    torchrun("train_pretrain.py", *args, "--batch_size", "2", "--fsdp", "--out_dir", tmp_path / "fsdp")
    assert metric_losses(tmp_path / "fsdp") == pytest.approx(metric_losses(tmp_path / "single"), abs=1e-3)
    assert (tmp_path / "fsdp" / "train_state" / "step_00000003" / "sharded").is_dir()

    resumed = tmp_path / "resumed"  # as if killed after step 3: the same run with only its first state
    shutil.copytree(tmp_path / "fsdp", resumed)
    shutil.rmtree(resumed / "train_state" / "step_00000006")
    result = torchrun("train_pretrain.py", *args, "--batch_size", "2", "--fsdp", "--out_dir", resumed, "--resume")
    assert "at step 3" in result.stdout
    assert metric_losses(resumed) == metric_losses(tmp_path / "fsdp")
