"""LoRA: teach a chat model a new task by training small low-rank adapters; the model itself stays frozen.

    python train_lora.py                                       # the demo: one-word verdicts (推荐 / 不推荐) on out/sft
    python train_lora.py --init_from out/sft --data_path my_task.jsonl --lora_r 16 --lora_targets q_proj,v_proj
    python -m scripts.merge_lora --init_from out/sft --lora out/lora --out_dir out/lora_merged

The data, packing and loss are SFT's (assistant tokens only); what differs is the model: every target projection
gets an adapter (model/lora.py), only adapter weights train, and out_dir receives only the adapter, in PEFT's layout
(adapter_config.json + adapter_model.safetensors), never a copy of the base weights. `eval_model.py --lora out/lora`
evaluates it on top of its base.

The demo replays pretraining as SFT does (2% of the items are pretraining documents): from one SFT model, the adapted
model's news perplexity was 11,884 without them and 1,100 with them, lora_acc 0.740 / 0.770, preference 0.610 / 0.780.
With --replay_kl 1 (the KL to the base added to those documents' tokens, trainer/chat_stage.py) the demo's adapted
model stays within its base's interval (news perplexity 439 against 451 without, the base 427), lora_acc 0.767 against
0.773 (seed 7: 0.803).
"""

from evals import lora_style
from model.lora import DEFAULT_TARGETS, EXPERT_TARGETS, apply_lora, save_lora, trainable_share
from trainer import UsageError, above, at_least, between, exit_cleanly_on_bad_input, parse_args
from trainer.chat_stage import add_chat_flags, run_chat_stage
from trainer.kd import add_kd_flags


def add_flags(p):
    add_chat_flags(p)
    add_kd_flags(p)  # --teacher: the adapters learn a teacher's distribution (trainer/kd.py)
    p.add_argument("--lora_r", type=at_least(1), default=8, help="adapter rank")
    p.add_argument("--lora_alpha", type=above(0), default=16, help="the update is scaled by lora_alpha / lora_r")
    p.add_argument("--lora_dropout", type=between(0, 1, high_open=True), default=0.0,
                   help="dropout on the adapter's input")
    p.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated Linear names to adapt (default: every attention and MLP projection; on "
                        "a mixture-of-experts model also every expert's w1,w2,w3)")


@exit_cleanly_on_bad_input
def main():
    demo = dict(data_path="dataset/demo/lora.jsonl:0.98,dataset/demo/pretrain.jsonl:0.02",
                val_data_path="dataset/demo/lora_eval.jsonl")
    args = parse_args("lora", dict(**demo, learning_rate=1e-3, weight_decay=0.01, epochs=2, batch_size=16,
                                   max_seq_len=256, warmup_steps=10, eval_every=0, save_every=100,
                                   sample_prompt=lora_style.PROMPTS[0].format(review="房间很干净，服务也周到，下次还来住。"),
                                   sample_tokens=16),
                      add_flags)
    targets = [name.strip() for name in args.lora_targets.split(",") if name.strip()]

    def add_adapters(model, run):
        """Freeze the model and give every target projection a trainable low-rank adapter (model/lora.py)."""
        adapted = targets + list(EXPERT_TARGETS) if model.moe and targets == list(DEFAULT_TARGETS) else targets
        try:
            apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=adapted)
        except ValueError as err:
            raise UsageError(f"LoRA (--lora_r/--lora_targets): {err}") from None
        trainable, total = trainable_share(model)
        run.print(f"LoRA: {trainable / 1e6:.2f}M trainable of {total / 1e6:.1f}M ({100 * trainable / total:.1f}%) | "
                  f"r {args.lora_r}, alpha {args.lora_alpha:g}, dropout {args.lora_dropout:g} on "
                  f"{', '.join(adapted)} | base {args.init_from} (frozen)")

    def save_adapter(model, out_dir):
        """What goes into out_dir: the adapter only (the trainer adds the tokenizer files)."""
        save_lora(model, out_dir, base_model_path=args.init_from)

    run_chat_stage(args, adapt_model=add_adapters, export_fn=save_adapter)  # SFT's loss, on the adapters only


if __name__ == "__main__":
    main()
