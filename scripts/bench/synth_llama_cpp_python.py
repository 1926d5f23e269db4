"""The baseline for scripts/bench/synth.sh: Magpie instruction generation with llama-cpp-python,
one request after another, as a user of magpie-align's scripts would run it on CPU.

Same GGUF, pre-query template, stops and sampling as `magpie synth --instructions-only`. The
llama-cpp-python defaults that magpie does not apply (top_k 40, min_p 0.05, repeat_penalty 1.1)
are switched off. Prints one JSON line.
"""
import argparse, json, time
from llama_cpp import Llama

from smollm2_pre_query import PRE_QUERY, STOPS

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--num", type=int, default=64)
p.add_argument("--max-tokens", type=int, default=256)
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()

llm = Llama(model_path=args.model, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
prompt = llm.tokenize(PRE_QUERY.encode(), add_bos=False, special=True)
instructions, generated, empty, truncated = [], 0, 0, 0
start = time.perf_counter()
for i in range(args.num):
    out = llm.create_completion(prompt=prompt, max_tokens=args.max_tokens, temperature=1.0, top_p=1.0, top_k=0,
                                min_p=0.0, repeat_penalty=1.0, stop=STOPS, seed=i)
    choice = out["choices"][0]
    generated += out["usage"]["completion_tokens"]
    text = choice["text"].strip()
    empty += text == ""
    truncated += choice["finish_reason"] == "length"
    instructions.append(text)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "generated_tokens": generated, "tok_per_s": generated / seconds,
                  "empty": empty, "truncated": truncated, "num": args.num, "samples": instructions[:5]}))
