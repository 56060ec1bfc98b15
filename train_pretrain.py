"""Pretraining: next-token prediction on raw text, from randomly initialised weights.

    python train_pretrain.py                                   # the demo: the `demo` preset on the demo corpus
    python train_pretrain.py --preset small --data_path pretrain_hq.jsonl --tokenizer_dir DIR
    torchrun --nproc_per_node 4 train_pretrain.py ...          # DDP, same flags

Data: {"text": ...} records (.jsonl, .json array or .parquet; comma-separate several files), tokenized once
into uint16 bins (dataset/bins.py) and read as packed windows of max_seq_len tokens: no padding, no
tokenizing in the training loop.

--num_experts E makes a mixture-of-experts model (a Mixtral checkpoint; model/model.py's MoE): E SwiGLU experts of
width --intermediate_size per layer, --num_experts_per_tok of them per token, and the load-balancing loss added with
weight --router_aux_loss_coef. --teacher DIR distils from a trained model's logits (trainer/kd.py).
"""

from pathlib import Path

import torch.nn.functional as F

from dataset.bins import prepare_bins
from dataset.chat import load_tokenizer
from dataset.lm_dataset import PretrainDataset
from dataset.mixing import parse_data_path
from model import LM, PRESETS, LMConfig
from model.config import MoEConfig
from trainer import (
    TrainConfig,
    UsageError,
    above,
    at_least,
    exit_cleanly_on_bad_input,
    format_summary,
    make_sample_fn,
    parse_args,
    require_vocab_fits,
    setup,
    teardown,
    train,
)
from trainer.checkpoint import model_shape
from trainer.kd import add_kd_flags, distillation

SHAPE_HELP = {"hidden_size": "width of the residual stream", "num_hidden_layers": "decoder layers",
              "num_attention_heads": "query heads", "num_key_value_heads": "key/value heads (grouped-query attention)",
              "intermediate_size": "width of the SwiGLU MLP"}


def add_flags(p):
    p.add_argument("--preset", choices=list(PRESETS), default="demo",
                   help="model size of a new model (model/config.py); not with --init_from")
    for name, meaning in SHAPE_HELP.items():
        p.add_argument(f"--{name}", type=at_least(1), help=f"{meaning} (default: the preset's)")
    p.add_argument("--rope_theta", type=above(0), help="RoPE base (default: the preset's)")
    p.add_argument("--bin_dir", help="where the tokenized data (uint16 token bins) is cached "
                                     "(default: bins/ beside --out_dir, i.e. OUT_DIR/../bins)")
    p.add_argument("--num_experts", type=int, default=0,
                   help="experts per layer: a mixture-of-experts model (Mixtral layout) instead of a dense one (0)")
    p.add_argument("--num_experts_per_tok", type=int, default=2, help="experts each token is routed to (top-k)")
    p.add_argument("--router_aux_loss_coef", type=float, default=0.01,
                   help="weight of the experts' load-balancing loss added to the training loss")
    add_kd_flags(p)


def logits(model, batch):
    return model(batch["input_ids"]).logits


def loss_fn(model, batch):
    """Cross-entropy of every position's next token (labels are already the next tokens)."""
    return F.cross_entropy(logits(model, batch).flatten(0, 1).float(), batch["labels"].flatten())


def model_config(args, vocab_size: int) -> LMConfig | MoEConfig:
    shape = {name: getattr(args, name) for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "intermediate_size", "rope_theta")}
    if args.num_experts:
        if not 1 <= args.num_experts_per_tok <= args.num_experts:
            raise UsageError(f"--num_experts_per_tok must be between 1 and --num_experts ({args.num_experts}), "
                             f"got {args.num_experts_per_tok}")
        config = MoEConfig.from_preset(args.preset, vocab_size=vocab_size, num_local_experts=args.num_experts,
                                       num_experts_per_tok=args.num_experts_per_tok,
                                       router_aux_loss_coef=args.router_aux_loss_coef, **shape)
    else:
        config = LMConfig.from_preset(args.preset, vocab_size=vocab_size, **shape)
    config.max_position_embeddings = max(config.max_position_embeddings, args.max_seq_len)
    return config


@exit_cleanly_on_bad_input
def main():
    demo = dict(data_path="dataset/demo/pretrain.jsonl", val_data_path="dataset/demo/pretrain_val.jsonl")
    # Muon on the matrices: at the demo's 360 steps it ended at news perplexity 504 [479, 528] against AdamW's 688 [661,
    # 716], for 5-12% more time per step (docs/demo_experiments.md).
    args = parse_args("pretrain", dict(**demo, optimizer="muon", max_seq_len=256, batch_size=16, learning_rate=2e-3,
                                       warmup_steps=100, eval_every=200, sample_every=200, sample_prompt="中国人民",
                                       save_every=200),
                      add_flags)
    if args.bin_dir is None:
        args.bin_dir = str(Path(args.out_dir).parent / "bins")
    tokenizer = load_tokenizer(args.tokenizer_dir)
    # A new model's shape (from --preset and the shape flags) is known before setup, which checks --out_dir by it.
    run = setup(args, shape=None if args.init_from else model_shape(model_config(args, len(tokenizer))))

    def token_windows(data_path: str) -> PretrainDataset:
        """Tokenize each file once, on rank 0 (the other ranks wait, then find the cached bins); weighted sources
        (a.jsonl:0.7,b.jsonl:0.3) are mixed by the dataset."""
        sources = parse_data_path(data_path)
        files, weights = [path for path, _ in sources], [weight for _, weight in sources]
        if run.is_main:
            for path in files:
                prepare_bins(path, args.tokenizer_dir, args.bin_dir, skip_bad=args.skip_bad)
        run.barrier()
        bins = [prepare_bins(path, args.tokenizer_dir, args.bin_dir, skip_bad=args.skip_bad, quiet=True)["bin_path"]
                for path in files]
        return PretrainDataset(bins, args.max_seq_len, weights=weights if weights[0] is not None else None,
                               seed=args.seed)

    train_data = token_windows(args.data_path)
    val_data = token_windows(args.val_data_path) if args.val_data_path else None

    if args.init_from:
        model = LM.from_pretrained(args.init_from)
    else:
        model = LM(model_config(args, len(tokenizer)))
    require_vocab_fits(model, tokenizer, args.tokenizer_dir)
    n_params = sum(p.numel() for p in model.parameters())
    origin = f"from {args.init_from}" if args.init_from else args.preset
    run.print(f"model: {n_params / 1e6:.2f}M parameters ({origin}: hidden {model.config.hidden_size}, "
              f"{model.config.num_hidden_layers} layers, {model.config.num_attention_heads} heads, "
              f"{model.config.num_key_value_heads} KV heads"
              + (f", {model.config.num_local_experts} experts, {model.config.num_experts_per_tok} per token"
                 if model.moe else "") + f") | data: {train_data.n_tokens:,} train tokens, "
              f"{len(train_data):,} windows of {args.max_seq_len} | {run.device} {str(run.dtype).split('.')[-1]}"
              f" x {run.world_size} process(es)")

    sample_fn = make_sample_fn(tokenizer, args.sample_prompt, chat=False, max_new_tokens=args.sample_tokens,
                               autocast=run.autocast)
    stage_loss = distillation(args, model, tokenizer, run, logits) if args.teacher else loss_fn
    summary = train(model, train_data, stage_loss, run, TrainConfig.from_args(args), val_data=val_data,
                    tokenizer=tokenizer, sample_fn=sample_fn)
    run.print(format_summary(summary))
    teardown(run)


if __name__ == "__main__":
    main()
