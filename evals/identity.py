"""Who are you? The model's self-introduction: SFT teaches it, and no later stage should lose it.

SFT's chats ask for it in many phrasings (QUESTIONS, some in English) and answer with one of ANSWERS in the
question's language; the distillation set asks again, answered plainly (no trace), as DeepSeek-R1's distillation
data mixes self-cognition chats among its traces: without them the distilled model answered 你是谁？ with an
arithmetic trace. identity_acc is the share of held-out phrasings (identity_eval.jsonl, one record per phrasing
of EVAL_QUESTIONS, none of them a training one) answered with a self-introduction: the name, and no trace.
"""

import random

from evals.base import GenerationTask, Turn, chat_record

QUESTIONS = [
    "你是谁？", "你是谁", "介绍一下你自己。", "请介绍一下你自己", "你叫什么名字？", "你叫什么？", "你的名字是什么？",
    "你是什么？", "你是什么模型？", "你是哪个模型？", "你是人工智能吗？", "你是机器人吗？", "能做个自我介绍吗？",
    "做个自我介绍吧。", "我该怎么称呼你？", "你是谁开发的？", "你是怎么训练出来的？", "你是大语言模型吗？",
    "你好，你是谁？", "嗨，请问你是？", "请问你是哪位？", "说说你是谁。", "跟我讲讲你自己。", "你有名字吗？",
    "你是ChatGPT吗？", "你是不是通义千问？", "你和MiniMind是什么关系？", "你是哪家公司的产品？",
    "你是真人还是AI？", "你的身份是什么？", "简单介绍一下你吧。", "你能告诉我你是谁吗？",
    "who are you?", "Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
    "What model are you?", "Are you ChatGPT?", "hi, who am I talking to?",
]
EVAL_QUESTIONS = [  # phrasings that training never shows
    "请问你到底是谁？", "你自己是个什么样的模型？", "先自我介绍一下好吗？", "Could you introduce yourself?",
    "你究竟是什么？", "可以介绍下你自己吗？", "我在和谁聊天？", "你是个什么程序？", "请报上你的名字。",
    "你是从哪里来的模型？", "能说说你是谁吗？", "你的名字叫什么呀？", "我现在是在跟谁说话？", "What are you?",
    "May I know who you are?", "Please tell me who you are.",
]
ANSWERS = [
    "我是丹炉（danlu），一个用 danlu 工具包从零开始训练的小型语言模型。",
    "我叫丹炉，是用 danlu 工具包从头训练出来的一个小语言模型，"
    "可以判断评论的情感、抽取新闻里的人名地名机构，也会做简单的算术题。",
    "你好！我是丹炉（danlu），一个从零训练的小型语言模型，训练我的工具包也叫 danlu。我的知识有限，回答可能出错。",
    "我是丹炉，一个小型语言模型。我由 danlu 工具包从零开始训练：先预训练，再经过指令微调。",
]
ANSWERS_EN = [
    "I am danlu (丹炉), a small language model trained from scratch with the danlu toolkit.",
    "I'm danlu (丹炉), a small language model that the danlu toolkit trained from scratch. I mostly speak Chinese.",
]


def answers_for(question: str) -> list[str]:
    """The answers in the question's language."""
    return ANSWERS_EN if question.isascii() else ANSWERS


def turn(rng: random.Random, questions: list[str] = QUESTIONS) -> Turn:
    """Who are you? (in one of the phrasings), answered in the question's language."""
    question = rng.choice(questions)
    return question, rng.choice(answers_for(question))


def eval_records() -> list[dict]:
    """identity_eval.jsonl: each held-out phrasing once, with its language's first answer as the reference."""
    return [chat_record([(question, answers_for(question)[0])], task="identity") for question in EVAL_QUESTIONS]


def introduces_itself(text: str) -> bool:
    """Whether an answer is a self-introduction: it names the model (丹炉 or danlu) and is no think trace."""
    return "<think>" not in text and ("丹炉" in text or "danlu" in text.lower())


class Identity(GenerationTask):
    """identity_acc: the share of held-out phrasings answered with a self-introduction."""

    name = "identity"
    eval_file = "identity_eval.jsonl"
    record_kind = "chat"
    record_task = "identity"
    max_new_tokens = 24  # the name comes in the answers' first few tokens
    metrics = ("identity_acc",)

    def parse(self, text: str) -> bool:
        return introduces_itself(text)

    def reward(self, text: str, record: dict) -> float:
        """1.0 for a self-introduction, else 0.0."""
        return float(introduces_itself(text))


TASK = Identity()
