"""The two sides of scripts/bench/synth-server.sh against one llama.cpp server.

openai-client: Magpie instruction harvesting with the official `openai` Python client on
asyncio, the same pre-query token ids, sampling, stops, seeds and concurrency as
`magpie synth --engine openai --instructions-only`. Prints one JSON line: wall seconds,
generated tokens (from `usage`), tok/s and the client's own CPU seconds.
"""
import argparse, asyncio, json, resource, time
import urllib.request
from openai import AsyncOpenAI

from smollm2_pre_query import PRE_QUERY, STOPS

p = argparse.ArgumentParser()
p.add_argument("--base-url", required=True)
p.add_argument("--num", type=int, default=64)
p.add_argument("--max-tokens", type=int, default=128)
p.add_argument("--concurrency", type=int, default=8)
p.add_argument("--seed", type=int, default=0, help="request i gets seed SEED * NUM + i")
args = p.parse_args()


def tokenize(text):
    root = args.base_url.removesuffix("/v1")
    body = json.dumps({"content": text, "add_special": False, "parse_special": True}).encode()
    request = urllib.request.Request(root + "/tokenize", data=body, headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(request))["tokens"]


async def main():
    client = AsyncOpenAI(base_url=args.base_url, api_key="none", max_retries=8)
    model = (await client.models.list()).data[0].id
    prompt = tokenize(PRE_QUERY)
    gate = asyncio.Semaphore(args.concurrency)

    async def one(i):
        async with gate:
            out = await client.completions.create(
                model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=1.0, top_p=1.0, stop=STOPS,
                seed=args.seed * args.num + i, extra_body={"top_k": -1, "min_p": 0.0, "repeat_penalty": 1.0})
            return out.usage.completion_tokens

    start = time.perf_counter()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    tokens = sum(await asyncio.gather(*(one(i) for i in range(args.num))))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    own = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
    print(json.dumps({"seconds": seconds, "generated_tokens": tokens, "tok_per_s": tokens / seconds, "cpu_seconds": own}))


asyncio.run(main())
