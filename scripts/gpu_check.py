"""Helpers of scripts/gpu-check.sh (the GPU machine has python3 with torch, transformers and
pyarrow, and no network):

    python3 scripts/gpu_check.py models TOKENIZER_DIR OUT [small]  # random-weight models + data
    python3 scripts/gpu_check.py torch-sft MODEL DATA STEPS   # the PyTorch eager baseline
    python3 scripts/gpu_check.py changed A B                  # how many weights differ
    python3 scripts/gpu_check.py losses RUN                   # a run's logged losses
    python3 scripts/gpu_check.py compare RUN_A RUN_B TOL      # two runs' losses step by step

`models` writes OUT/m135 (SmolLM2-135M's shape), OUT/m1b (Llama-3.2-1B's shape; not with `small`),
both with random weights and the SmolLM2 tokenizer, OUT/sft.parquet (256 synthetic conversations) and
OUT/dpo.parquet (64 synthetic preference pairs).
"""
import json, random, shutil, sys, time
from pathlib import Path


def models(tokenizer_dir, out, size="full"):
    import torch
    import pyarrow as pa, pyarrow.parquet as pq
    from transformers import LlamaConfig, LlamaForCausalLM
    out = Path(out)
    shapes = {
        "m135": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
        "m1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    }
    for name, shape in shapes.items():
        if size == "small" and name == "m1b":
            continue
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=8192, **shape))
        model.save_pretrained(out / name)
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, out / name / f.name)
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from it an be this which or are have not but".split() + \
        [f"w{i}" for i in range(400)]
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))
    convs = [[{"role": "user", "content": text(rng.randint(30, 120))}, {"role": "assistant", "content": text(rng.randint(200, 600))}]
             for _ in range(256)]
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    pq.write_table(pa.table({"messages": pa.array(convs, msg)}), out / "sft.parquet")
    pairs = [(text(40), text(rng.randint(30, 90)), text(rng.randint(30, 90))) for _ in range(64)]
    pq.write_table(pa.table({"prompt": [p[0] for p in pairs], "chosen": [p[1] for p in pairs], "rejected": [p[2] for p in pairs]}),
                   out / "dpo.parquet")


def torch_sft(model_dir, data, steps):
    """A plain PyTorch eager loop: transformers with SDPA, bf16 weights, fused AdamW, batch 4 x 2048
    of the conversations' tokens laid end to end (causal over each row). Prints tokens/s over the
    steps after the first two, peak memory and the parameter count."""
    import torch
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model.gradient_checkpointing_disable()
    stream = []
    for messages in pq.read_table(data).column("messages").to_pylist():
        stream += tok.apply_chat_template(messages, tokenize=True)
    rows, length = 4, 2048
    need = rows * length * steps
    stream = (stream * (need // len(stream) + 1))[:need]
    batches = torch.tensor(stream).view(steps, rows, length)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        ids = batches[step].cuda()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = times[2:]
    print(json.dumps({"tok_per_s": rows * length * len(timed) / sum(timed), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "parameters": sum(p.numel() for p in model.parameters())}))


def changed(a, b):
    from safetensors.torch import load_file
    x, y = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    total = sum(t.numel() for t in x.values())
    moved = sum((x[k].float() != y[k].float()).sum().item() for k in x)
    print(json.dumps({"weights": total, "changed": moved, "share": moved / total}))


def run_losses(run):
    rows = [json.loads(line) for line in open(Path(run) / "metrics.jsonl")]
    return [r["loss"] for r in rows if "grad_norm" in r]


def losses(run):
    print(" ".join(f"{loss:.6f}" for loss in run_losses(run)))


def compare(run_a, run_b, tolerance):
    a, b = run_losses(run_a), run_losses(run_b)
    worst = max(abs(x - y) for x, y in zip(a, b))
    ok = worst <= float(tolerance) and len(a) == len(b) > 0
    print(f"max |difference| {worst:.1e} over {len(a)} steps, within {tolerance}: {'ok' if ok else 'FAILED'}")


def rate(run):
    """Training tokens per second over the steps after the first (which compiles and warms up)."""
    rows = [json.loads(line) for line in open(Path(run) / "metrics.jsonl")]
    steady = [r for r in rows if "tokens_per_second" in r][1:]
    print(f"{sum(r['tokens'] for r in steady) / sum(r['tokens'] / r['tokens_per_second'] for r in steady):,.0f}")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"models": lambda: models(*args), "torch-sft": lambda: torch_sft(args[0], args[1], int(args[2])), "changed": lambda: changed(*args),
     "losses": lambda: losses(*args), "compare": lambda: compare(*args), "rate": lambda: rate(*args)}[command]()
