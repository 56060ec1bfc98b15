"""The CUDA path: bf16 training through the trainer, torch.compile, fused AdamW, the flash SDPA kernel, generation.

Every test here is skipped on a machine without CUDA; on a GPU machine `python -m pytest tests/test_cuda.py` runs them.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import LM, LMConfig
from tests.conftest import run_script
from trainer.optim import build_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
TINY = ["--preset", "tiny", "--batch_size", "4", "--max_seq_len", "64", "--log_every", "2", "--eval_every", "4",
        "--eval_batches", "2", "--sample_every", "4", "--sample_tokens", "8", "--warmup_steps", "2", "--max_steps", "8",
        "--save_every", "8", "--device", "cuda"]


def flash_capable() -> bool:
    """PyTorch's flash-attention kernel needs an Ampere (sm80) or newer GPU."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def tiny_model(**overrides) -> LM:
    torch.manual_seed(0)
    return LM(LMConfig.from_preset("tiny", vocab_size=256, **overrides)).to(CUDA)


def train_steps(model: LM, optimizer, ids: torch.Tensor, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("compile_flag", [[], ["--compile"]], ids=["eager", "compiled"])
def test_pretrain_trains_in_bf16_on_cuda(tmp_path, corpus, tokenizer_dir, compile_flag):
    out = tmp_path / "pretrain"
    result = run_script("train_pretrain.py", "--data_path", corpus["train"], "--val_data_path", corpus["val"],
                        "--tokenizer_dir", tokenizer_dir, "--out_dir", out, "--bin_dir", tmp_path / "bins",
                        "--dtype", "bf16", *TINY, *compile_flag, timeout=600)
    assert "cuda bfloat16" in result.stdout  # the model line names device and autocast dtype
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert any("sample" in r for r in rows)  # generation during training ran on the GPU
    assert (out / "model.safetensors").is_file()


def test_compiled_model_matches_eager_and_trains():
    model = tiny_model()
    ids = torch.randint(3, 256, (2, 33), device=CUDA)
    compiled = torch.compile(model)
    with torch.no_grad():
        eager_logits = model(ids).logits
        compiled_logits = compiled(ids).logits
    assert (eager_logits - compiled_logits).abs().max().item() < 1e-3
    optimizer = build_optimizer(model, 1e-2, 0.0, CUDA)
    losses = train_steps(compiled, optimizer, ids, steps=5)
    assert losses[-1] < losses[0]


def test_fused_adamw_on_cuda_equals_the_reference_update():
    model = tiny_model()
    optimizer = build_optimizer(model, 1e-3, 0.1, CUDA)
    assert optimizer.defaults["fused"] is True
    reference = tiny_model()
    reference_optimizer = torch.optim.AdamW(
        [{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), foreach=False)
    ids = torch.randint(3, 256, (2, 33), device=CUDA)
    for _ in range(3):
        for m, opt in ((model, optimizer), (reference, reference_optimizer)):
            loss = F.cross_entropy(m(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not flash_capable(), reason="flash attention needs sm80+")
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_attention_runs_on_the_flash_kernel(kv_heads):
    """Inside sdpa_kernel(FLASH_ATTENTION) SDPA raises rather than fall back, so this passing means our attention
    (training, prefill and KV-cache decoding) is eligible for the flash kernel."""
    model = tiny_model(num_attention_heads=4, num_key_value_heads=kv_heads)
    ids = torch.randint(3, 256, (2, 65), device=CUDA)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        out = model.generate(ids[:, :8], max_new_tokens=6, eos_token_id=[])
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    assert out.shape == (2, 14)
    with torch.no_grad():  # flash in bf16 agrees with fp32 attention to bf16 precision
        reference = model(ids[:, :-1]).logits
    assert ((logits.float() - reference).norm() / reference.norm()).item() < 0.05


def test_generation_on_cuda_equals_a_full_recompute():
    """Greedy KV-cache decoding on the GPU: every new token is the argmax of a full forward over the sequence so far."""
    model = tiny_model().eval()
    prompt = torch.randint(3, 256, (3, 7), device=CUDA)
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=[])
    assert out.device.type == "cuda" and out.shape == (3, 17)
    with torch.no_grad():
        full = model(out[:, :-1]).logits
    assert torch.equal(full[:, 6:].argmax(-1), out[:, 7:])
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the default precision on a GPU
        bf16 = model.generate(prompt, max_new_tokens=10, eos_token_id=[])
    assert bf16.shape == out.shape and ((bf16 >= 0) & (bf16 < 256)).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
