"""The GGUF export run by llama.cpp (llama-cpp-python, installed apart: `pip install llama-cpp-python`, which builds
llama.cpp from source): a checkpoint exported f32 and q8_0, each file's size, its logits on four chat prompts (the
demo's side-by-side questions) against ours, and its greedy answers against ours.

    python -m docs.gguf_check out/sft
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from dataset.chat import render_chat
from serving.gguf import export_gguf
from serving.loading import load

QUESTIONS = ["下面这条评论是正面的还是负面的？\n房间很干净，服务员也很热情。",
             "找出这句话里的人名、地名和机构名：新华社北京三月五日电", "有15个苹果，吃了3个，还剩几个？", "你是谁？"]


def main(model_dir: str) -> None:
    import llama_cpp

    loaded = load(model_dir, device="cpu")  # fp32 on the CPU, in eval mode: the model we compare with
    tokenizer, model = loaded.tokenizer, loaded.model
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in ("f32", "q8_0"):
            path = Path(tmp) / f"{outtype}.gguf"
            export_gguf(loaded.model, loaded.tokenizer, model_dir, path, "check", outtype)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=2)
            worst, same = 0.0, 0
            for question in QUESTIONS:
                text = render_chat([{"role": "user", "content": question}], add_generation_prompt=True)
                prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logits = model(torch.tensor([prompt])).logits[0].float().numpy()
                    ours = model.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False)[0, len(prompt):]
                llm.reset()
                llm.eval(prompt)
                worst = max(worst, float(np.abs(np.array(llm.scores[:len(prompt)]) - logits).max()))
                theirs = []
                for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                    theirs.append(token)
                    if token == stop or len(theirs) == len(ours):
                        break
                same += theirs == ours.tolist()[:len(theirs)]
                print(f"  {outtype}: {tokenizer.decode(theirs).replace(chr(10), ' ')[:60]}")
            print(f"{outtype}: {path.stat().st_size / 1e6:.1f} MB, logits within {worst:.3f} of ours (their spread "
                  f"{logits.std():.2f}), greedy answers equal to ours {same}/{len(QUESTIONS)}", flush=True)
            llm.close()


if __name__ == "__main__":
    main(sys.argv[1])
