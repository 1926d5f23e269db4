"""The synthesis side of scripts/gpu-check.sh, on the GPU machine (python3 with torch,
transformers and safetensors; no network, no llama.cpp tools):

    python3 scripts/gpu_check_synth.py models TOKENIZER_DIR OUT [small]   # OUT/s1b and OUT/s1b.gguf
    python3 scripts/gpu_check_synth.py hf-generate MODEL PROMPTS BATCH
    python3 scripts/gpu_check_synth.py prompts OUT.parquet N SYNTH_DIR...   # N rows of synth output
    python3 scripts/gpu_check_synth.py invariance ALONE_DIR BATCHED_DIR     # greedy answers compared

`models` makes one random-weight model twice: OUT/s1b, a Hugging Face directory (bf16, for mistralrs
and transformers), and OUT/s1b.gguf, the same weights in F16 GGUF (for llama.cpp), written here
with GGUF v3's layout and llama.cpp's tensor names (q and k rows permuted as convert_hf_to_gguf.py
does) and SmolLM2's tokenizer from TOKENIZER_DIR. The shape is Llama-3.2-1B's with SmolLM2's
49,152-token vocabulary (1.07B parameters); `small` is a 4-layer, 256-wide one for a CPU rehearsal.

`hf-generate` is the baseline: transformers `generate` with SDPA in bf16, in batches of BATCH, at
gpu-check.sh's synth lengths: PROMPTS instructions (64 sampled tokens after a ~12-token pre-query
prompt) and PROMPTS answers (128 tokens after ~90-token prompts); no early stop, so every sequence
makes all its tokens. Prints generated tokens per second over both stages as JSON.
"""
import json, struct, sys, time
from pathlib import Path

import numpy as np

SHAPES = {
    "full": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
}

# GGUF v3 metadata value types and ggml tensor types.
UINT32, INT32, FLOAT32, STRING, ARRAY = 4, 5, 6, 8, 9
GGML_F32, GGML_F16 = 0, 1


def gguf_string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_value(kind, value):
    if kind == STRING:
        return gguf_string(value)
    if kind == ARRAY:
        item_kind, items = value
        return struct.pack("<IQ", item_kind, len(items)) + b"".join(gguf_value(item_kind, v) for v in items)
    return struct.pack({UINT32: "<I", INT32: "<i", FLOAT32: "<f"}[kind], value)


def write_gguf(path, metadata, tensors, alignment=32):
    """metadata: [(key, kind, value)]; tensors: [(name, numpy array f16 or f32)]."""
    infos, offset = [], 0
    for name, array in tensors:
        kind = GGML_F16 if array.dtype == np.float16 else GGML_F32
        dims = list(reversed(array.shape))  # ggml lists the innermost dimension first
        infos.append(gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", kind, offset))
        offset += (array.nbytes + alignment - 1) // alignment * alignment
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
        for key, kind, value in metadata:
            f.write(gguf_string(key) + struct.pack("<I", kind) + gguf_value(kind, value))
        for info in infos:
            f.write(info)
        f.write(b"\0" * (-f.tell() % alignment))
        for _, array in tensors:
            f.write(np.ascontiguousarray(array).tobytes())
            f.write(b"\0" * (-array.nbytes % alignment))


def tokenizer_metadata(tokenizer_dir):
    tok = json.load(open(Path(tokenizer_dir) / "tokenizer.json"))
    config = json.load(open(Path(tokenizer_dir) / "tokenizer_config.json"))
    vocab = dict(tok["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
    vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
    tokens = [None] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    types = [3 if t in special else 1 for t in tokens]  # 3: control, 1: normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    template = config.get("chat_template")
    if template is None and (Path(tokenizer_dir) / "chat_template.jinja").exists():
        template = (Path(tokenizer_dir) / "chat_template.jinja").read_text()
    ids = lambda key: vocab[config[key]] if isinstance(config.get(key), str) else vocab[config[key]["content"]]
    meta = [("tokenizer.ggml.model", STRING, "gpt2"), ("tokenizer.ggml.pre", STRING, "smollm"),
            ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)), ("tokenizer.ggml.token_type", ARRAY, (INT32, types)),
            ("tokenizer.ggml.merges", ARRAY, (STRING, merges)),
            ("tokenizer.ggml.bos_token_id", UINT32, ids("bos_token")), ("tokenizer.ggml.eos_token_id", UINT32, ids("eos_token"))]
    if template:
        meta.append(("tokenizer.chat_template", STRING, template))
    return meta, len(tokens)


def models(tokenizer_dir, out, size="full"):
    import shutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    out = Path(out)
    meta, vocab = tokenizer_metadata(tokenizer_dir)
    shape = SHAPES[size]
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=500000.0,
                         rms_norm_eps=1e-5, bos_token_id=meta[5][2], eos_token_id=meta[6][2], **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out / "s1b")
    # transformers 5 writes only `rope_parameters`; mistralrs 0.8.1 needs `rope_theta` beside it.
    saved = json.load(open(out / "s1b" / "config.json"))
    saved["rope_theta"] = 500000.0
    json.dump(saved, open(out / "s1b" / "config.json", "w"), indent=2)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / "s1b" / f.name)
    heads, kv_heads, layers = shape["num_attention_heads"], shape["num_key_value_heads"], shape["num_hidden_layers"]
    # convert_hf_to_gguf.py's LlamaModel.permute: rotary halves (HF) to interleaved pairs (llama.cpp).
    permute = lambda w, n: w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    tensors = [("token_embd.weight", state["model.embed_tokens.weight"].astype(np.float16))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [
            (f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"]),
            (f"blk.{i}.attn_q.weight", permute(state[p + "self_attn.q_proj.weight"], heads).astype(np.float16)),
            (f"blk.{i}.attn_k.weight", permute(state[p + "self_attn.k_proj.weight"], kv_heads).astype(np.float16)),
            (f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"].astype(np.float16)),
            (f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"].astype(np.float16)),
            (f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"]),
            (f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"].astype(np.float16)),
            (f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"].astype(np.float16)),
            (f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"].astype(np.float16)),
        ]
    tensors.append(("output_norm.weight", state["model.norm.weight"]))
    arch = [("general.architecture", STRING, "llama"), ("general.name", STRING, f"random {size} llama"),
            ("llama.context_length", UINT32, 8192), ("llama.embedding_length", UINT32, shape["hidden_size"]),
            ("llama.block_count", UINT32, layers), ("llama.feed_forward_length", UINT32, shape["intermediate_size"]),
            ("llama.attention.head_count", UINT32, heads), ("llama.attention.head_count_kv", UINT32, kv_heads),
            ("llama.rope.freq_base", FLOAT32, 500000.0), ("llama.attention.layer_norm_rms_epsilon", FLOAT32, 1e-5),
            ("llama.rope.dimension_count", UINT32, shape["hidden_size"] // heads), ("llama.vocab_size", UINT32, vocab),
            ("general.file_type", UINT32, 1)]
    write_gguf(out / "s1b.gguf", arch + meta, tensors)
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "vocab": vocab}))


def hf_generate(model_dir, prompts, batch):
    import torch
    from transformers import AutoModelForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the rehearsal
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").to(device=device, dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    warm = torch.randint(0, vocab, (batch, 12), generator=generator).to(device)
    model.generate(warm, max_new_tokens=8, min_new_tokens=8, do_sample=True, pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    start, made = time.perf_counter(), 0
    for prompt_tokens, new_tokens in [(12, 64), (90, 128)]:
        for first in range(0, prompts, batch):
            n = min(batch, prompts - first)
            ids = torch.randint(0, vocab, (n, prompt_tokens), generator=generator).to(device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=True, temperature=1.0, top_p=1.0, pad_token_id=0)
            made += (out.shape[1] - prompt_tokens) * n
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"{made / seconds:.0f} tok/s ({made} tokens, {prompts} prompts a stage, batches of {batch})")


def synth_rows(directory, columns):
    import glob
    import pyarrow as pa, pyarrow.parquet as pq
    files = sorted(glob.glob(f"{directory}/**/*.parquet", recursive=True))
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files]) if files else None


def prompts(out, n, *synth_dirs):
    """The first N rows of the first synth output that has any, as `synth --input` takes them."""
    import pyarrow.parquet as pq
    for directory in synth_dirs:
        rows = synth_rows(directory, ["uuid", "messages"])
        if rows is not None and rows.num_rows:
            pq.write_table(rows.slice(0, int(n)), out)
            return
    sys.exit(f"no synth output in {synth_dirs} to take prompts from")


def invariance(alone_dir, batched_dir):
    """How many greedy answers differ between alone and batched, and how many batched answers are
    another prompt's alone answer (a batch that mixes up its sequences)."""
    answers = lambda d: {r["uuid"]: r["response"] for r in synth_rows(d, ["uuid", "response"]).to_pylist()}
    alone, batched = answers(alone_dir), answers(batched_dir)
    differ = sum(alone[k] != batched.get(k) for k in alone)
    others = sum(batched.get(k) == alone[j] != alone[k] for k in alone for j in alone if j != k)
    print(f"{differ} of {len(alone)} greedy answers differ between alone and batched; {others} batched answers are another prompt's")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "models":
        models(*args)
    elif command == "hf-generate":
        hf_generate(args[0], int(args[1]), int(args[2]))
    elif command == "prompts":
        prompts(*args)
    elif command == "invariance":
        invariance(*args)
    else:
        sys.exit(f"unknown command {command}")
