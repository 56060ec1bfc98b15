"""An OpenAI-compatible server for a danlu checkpoint, with a web chat page at /.

    python serve.py --model out/sft [--lora out/lora] [--host 127.0.0.1] [--port 8000] [--api_key KEY]
    python serve.py --model out/sft --model out/dpo --model think=out/distill   # several, picked by "model"
    python serve.py --model out/sft --lora_modules verdict=out/lora              # adapters next to their base
    python serve.py --model out/sft --allow_runtime_lora     # POST /v1/load_lora_adapter adds one while serving

Endpoints: GET /v1/models, POST /v1/chat/completions, /v1/responses and /v1/completions (streaming with
"stream": true), GET /health, GET /metrics (Prometheus), and the chat page at http://HOST:PORT/. Requests that
arrive while others are decoding join the running batch (continuous batching, serving/engine.py).
"""

import argparse
import sys

from serving.api import serve
from serving.loading import LoadError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, action="append",
                   help="checkpoint directory (config.json, model.safetensors, tokenizer), or NAME=DIR; give it "
                        "again to serve several models, each with its own engine, picked by a request's \"model\"")
    p.add_argument("--lora", help="LoRA adapter directory, merged into --model in memory")
    p.add_argument("--lora_modules", nargs="+", metavar="NAME=DIR",
                   help="LoRA adapters served unmerged next to --model, each under its NAME (vLLM's "
                        "--lora-modules): a request picks one by \"model\", and one batch mixes them")
    p.add_argument("--allow_runtime_lora", action="store_true",
                   help="POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter {lora_name} "
                        "add and remove adapters while serving (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING); any client "
                        "with the API key may then make the server read a directory of its disk")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--served_model_name", help="the model id clients send (default: the directory name)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--max_batch", type=int, default=32, help="most sequences decoded together")
    p.add_argument("--chat", choices=["auto", "yes", "no"], default="auto",
                   help="chat model or base model (auto: from args.json's stage, as eval_model.py decides)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        serve(args.model, args.lora, args.host, args.port, args.api_key, args.served_model_name, args.device,
              args.max_batch, None if args.chat == "auto" else args.chat == "yes", args.lora_modules,
              args.allow_runtime_lora)
    except (LoadError, FileNotFoundError) as exc:
        print(f"serve.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
