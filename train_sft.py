"""Supervised fine-tuning: teach the pretrained model to answer in chats, full-parameter.

    python train_sft.py                                        # the demo: out/pretrain -> out/sft
    python train_sft.py --data_path sft_mini_512.jsonl --init_from out/pretrain --max_seq_len 512
    torchrun --nproc_per_node 4 train_sft.py ...               # DDP, same flags

Data: chat JSONL in any shape dataset/formats.py reads (MiniMind, OpenAI, ShareGPT, Alpaca; reasoning_content,
tools and tool calls included), rendered with the ChatML template. The loss covers assistant tokens: every assistant
turn of a conversation and its <|im_end|> (with --prompt_loss_weight W, the rest of the conversation too, at weight
W). Conversations are tokenized once and packed several to a row, each attending only to itself, so padding does not
eat the batch.

The demo replays pretraining: 5% of its items are pretraining documents (`{"text"}` records, trained on every
token). Without them the chats overwrite the language model: the held-out news perplexity went from pretraining's
688 to 10,493 in 300 steps (an earlier model); with 2%, 1,085. The demo also trains on the prompts at a tenth of the
answers' weight (--prompt_loss_weight 0.1, run_demo.sh): from the `demo` model's 372, SFT ends at 427 against 587
with 2% alone, sentiment within its interval. With --replay_kl 2 the documents also carry the
pretrained model's whole next-token distribution (2 * KL(pretrained || model) at each of their tokens,
trainer/chat_stage.py's TextAnchor): 390 against 433, inside pretraining's interval [349, 396], sentiment 0.747
against 0.770 (within each other's intervals), for ~15% more time per step; the demo's 4 (with the weight below)
gives 382 / 385 against 2's 392 / 394 on two seeds. With --token_weight 正:4,负:4 (the demo's)
the one token of a sentiment answer that is its verdict counts four times: held-out sentiment 0.820 against 0.787 /
0.783 on two seeds, and LoRA's verdict from it 0.813 / 0.807. docs/demo_experiments.md has the figures.

With --teacher DIR the loss is knowledge distillation on the same assistant tokens (trainer/kd.py):
(1 - kd_alpha) * CE + kd_alpha * T^2 * KL(teacher || student), logged as ce and kl.
"""

from trainer import exit_cleanly_on_bad_input, parse_args
from trainer.chat_stage import add_chat_flags, run_chat_stage
from trainer.kd import add_kd_flags


def add_flags(p):
    add_chat_flags(p)
    add_kd_flags(p)


@exit_cleanly_on_bad_input
def main():
    demo = dict(data_path="dataset/demo/sft.jsonl:0.95,dataset/demo/pretrain.jsonl:0.05",
                val_data_path="dataset/demo/sft_eval.jsonl")
    args = parse_args("sft", dict(**demo, max_seq_len=256, batch_size=16, learning_rate=5e-4, warmup_steps=50,
                                  eval_every=200, sample_every=200, sample_tokens=32, save_every=200,
                                  sample_prompt="下面这条评论是正面的还是负面的？\n房间很干净，服务员也很热情，下次还会再来。"),
                      add_flags)
    run_chat_stage(args)  # assistant-token cross-entropy on packed chats (trainer/chat_stage.py)


if __name__ == "__main__":
    main()
