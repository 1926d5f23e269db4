"""Helpers of scripts/gpu-check.sh (the GPU machine has python3 with torch, transformers and
pyarrow, and no network):

    python3 scripts/gpu_check.py models TOKENIZER_DIR OUT [small]  # random-weight models + data
    python3 scripts/gpu_check.py torch-sft MODEL DATA STEPS [DEVICE LENGTH]   # the PyTorch eager baseline
    python3 scripts/gpu_check.py changed A B                  # how many weights differ
    python3 scripts/gpu_check.py losses RUN                   # a run's logged losses
    python3 scripts/gpu_check.py compare RUN_A RUN_B TOL      # two runs' losses step by step
    python3 scripts/gpu_check.py encoder SRC OUT              # a random-weight encoder of SRC's shape
    python3 scripts/gpu_check.py embed MODEL CORPUS DEVICE BATCH   # sentence-transformers' encode, rows/s
    python3 scripts/gpu_check.py fusion DEVICE [TOKENS]      # q/k/v and gate/up: separate vs fused matmuls

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


def torch_sft(model_dir, data, steps, device="cuda", length=2048):
    """A plain PyTorch eager loop as HF's Trainer runs it with bf16=True: transformers with SDPA,
    f32 weights under bf16 autocast (mixed precision, as magpie's f32 master weights), fused AdamW,
    batch 4 x LENGTH of the conversations' tokens laid end to end (causal over each row). Prints
    tokens/s over the steps after the first two, peak memory (CUDA) and the parameter count."""
    import torch
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer
    steps, length = int(steps), int(length)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").float().to(device)
    model.gradient_checkpointing_disable()
    stream = []
    for messages in pq.read_table(data).column("messages").to_pylist():
        # return_dict=False: transformers 5 returns a BatchEncoding by default.
        stream += list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))
    rows = 4
    need = rows * length * steps
    stream = (stream * (need // len(stream) + 1))[:need]
    batches = torch.tensor(stream).view(steps, rows, length)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps):
        sync()
        start = time.perf_counter()
        ids = batches[step].to(device)
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    timed = times[2:]
    print(json.dumps({"tok_per_s": rows * length * len(timed) / sum(timed),
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
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


def encoder(src, out):
    """A BERT of all-MiniLM-L6-v2's shape with random weights (a call cannot carry the real 90 MB),
    with SRC's tokenizer and sentence-transformers files: rows/s does not depend on the weights."""
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(src)).save_pretrained(out)
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, Path(out) / f.name)


def embed(model_dir, corpus, device, batch):
    """sentence-transformers' `encode` of a mean-pooling BERT, written out in transformers (the GPU
    machine has no sentence-transformers): the texts longest first, batches of BATCH truncated at
    the model's max_seq_length, mean pooling over the attention mask, L2-normalised, each batch
    copied to the host. Prints rows/s."""
    import torch
    import pyarrow.parquet as pq
    from transformers import AutoModel, AutoTokenizer
    texts = pq.read_table(corpus, columns=["instruction"]).column("instruction").to_pylist()
    settings = Path(model_dir) / "sentence_bert_config.json"
    max_length = json.load(open(settings))["max_seq_length"] if settings.exists() else 256
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).to(device).eval()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    batch = int(batch)
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(texts), batch):
            enc = tok([texts[i] for i in order[b:b + batch]], padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1).cpu()
    seconds = time.perf_counter() - start
    print(f"transformers (sentence-transformers' encode) device={device} rows={len(texts)} seconds={seconds:.1f} rows_per_second={len(texts) / seconds:.0f}")


def fusion(device, tokens=8192):
    """Whether one matmul for q, k and v (and one for gate and up) beats separate ones: forward and
    backward of a decoder layer's input projections (bf16 on CUDA, f32 on the CPU) at SmolLM2-135M's,
    Llama-3.2-1B's and Llama-3.1-8B's shapes, TOKENS tokens, timed over 10 repeats after 3 warm-ups.
    Prints the fused time over the separate time for each shape (below 1: fusing is faster)."""
    import torch
    tokens = int(tokens)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    shapes = {"135M": (576, 192, 1536), "1B": (2048, 512, 8192), "8B": (4096, 1024, 14336)}
    parts = []
    for name, (hidden, kv, inner) in shapes.items():
        x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
        groups = {"qkv": [hidden, kv, kv], "gate_up": [inner, inner]}
        for group, outs in groups.items():
            separate = [torch.randn(o, hidden, device=device, dtype=dtype, requires_grad=True) for o in outs]
            fused = torch.randn(sum(outs), hidden, device=device, dtype=dtype, requires_grad=True)

            def run_separate():
                ys = [x @ w.t() for w in separate]
                torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])

            def run_fused():
                ys = (x @ fused.t()).split(outs, dim=-1)
                torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])

            timing = {}
            for label, fn in [("separate", run_separate), ("fused", run_fused)]:
                for _ in range(3):
                    fn()
                sync()
                start = time.perf_counter()
                for _ in range(10):
                    fn()
                sync()
                timing[label] = (time.perf_counter() - start) / 10
            parts.append(f"{name} {group} {timing['fused'] / timing['separate']:.3f} ({timing['separate'] * 1e3:.2f} ms separate)")
    print(f"fused / separate, forward + backward, {tokens} tokens, {dtype}: " + "; ".join(parts))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"models": lambda: models(*args), "torch-sft": lambda: torch_sft(*args), "changed": lambda: changed(*args),
     "losses": lambda: losses(*args), "compare": lambda: compare(*args), "rate": lambda: rate(*args),
     "encoder": lambda: encoder(*args), "embed": lambda: embed(*args), "fusion": lambda: fusion(*args)}[command]()
