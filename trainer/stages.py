"""The pipeline in one table: every stage's script, where it writes, what it starts from, what it trains.

The stage scripts take their default --out_dir / --init_from from here, eval_model.py its columns, and
scripts/run_demo.sh its order; a new stage is one row.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    script: str
    out_dir: str  # default --out_dir
    init_from: str | None  # default --init_from (the usual previous stage's out_dir)
    chat: bool  # a chat model (prompts as ChatML user turns) or a base model (raw text)
    adapter: bool = False  # writes a LoRA adapter, not a whole model
    generates: bool = True  # writes a language model (not a reward model, which scores text)
    in_demo: bool = True  # scripts/run_demo.sh runs it


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("tokenizer", "train_tokenizer.py", "out/tokenizer", None, chat=False),
    Stage("pretrain", "train_pretrain.py", "out/pretrain", None, chat=False),
    Stage("sft", "train_sft.py", "out/sft", "out/pretrain", chat=True),
    Stage("lora", "train_lora.py", "out/lora", "out/sft", chat=True, adapter=True),
    Stage("dpo", "train_dpo.py", "out/dpo", "out/sft", chat=True),
    Stage("distill", "train_distill_reason.py", "out/distill", "out/dpo", chat=True),
    Stage("reward", "train_reward.py", "out/reward", "out/sft", chat=True, generates=False),
    Stage("grpo", "train_grpo.py", "out/grpo", "out/distill", chat=True),
    Stage("ppo", "train_ppo.py", "out/ppo", "out/distill", chat=True, in_demo=False),
)}

# The stages that write a model eval_model.py can compare, in pipeline order.
MODEL_STAGES: tuple[str, ...] = tuple(name for name, s in STAGES.items() if name != "tokenizer" and s.generates)


def stage_of_script(script: str) -> Stage:
    """The stage whose script is `script` (a path or a file name)."""
    name = script.rsplit("/", 1)[-1]
    return next(s for s in STAGES.values() if s.script == name)
