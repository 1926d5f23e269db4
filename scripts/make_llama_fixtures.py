"""Writes the reference outputs src/train/model tests compare against, once, with transformers.
Models are built with deterministic weights (scripts/tiny_models.py; the Rust tests build the same
ones), so only configs and outputs are tracked:

- data/fixtures/tiny-llama/: a tiny Llama (GQA, Llama-3.1 rope scaling, untied head); its config.json
  as transformers 5 writes it (`rope_parameters`, no `rope_theta`) and reference.json with input_ids
  and f32 logits.
- data/fixtures/tiny-qwen2/: the same for a tiny Qwen2 (qkv bias, tied embeddings).
- data/fixtures/tiny-llama-reward/: a tiny LlamaForSequenceClassification with a pad token, and its
  scores on a right-padded batch.
- data/fixtures/smollm2-logits.json: SmolLM2-135M-Instruct loaded by transformers straight from the
  set-up's Q4_1 GGUF (its own dequantisation), input_ids of a chat prompt and the logits (every
  position for the first 1024 vocab entries, and the full last row).

    .venv/bin/pip install transformers gguf accelerate && .venv/bin/python scripts/make_llama_fixtures.py
"""
import os, pathlib
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification, Qwen2Config, Qwen2ForCausalLM)
from tiny_models import fill_deterministic, write_tensors_json

root = pathlib.Path(__file__).resolve().parent.parent
fixtures = root / "data" / "fixtures"
home = pathlib.Path(os.environ.get("MAGPIE_HOME", root / "models"))
ids = torch.tensor([[1, 17, 200, 33, 45, 9, 250, 3, 77, 128, 5, 6], [2, 99, 14, 15, 16, 200, 201, 7, 8, 9, 10, 11]])
small = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


def save(model, name, scores=False):
    out = fixtures / name
    out.mkdir(parents=True, exist_ok=True)
    fill_deterministic(model.eval())
    model.config.save_pretrained(out)
    with torch.no_grad():
        tensors = {"input_ids": ids.clone()}
        if scores:
            padded = ids.clone()
            padded[1, 8:] = model.config.pad_token_id
            tensors["input_ids"] = padded
            tensors["scores"] = model(input_ids=padded).logits.float()
        else:
            tensors["logits"] = model(input_ids=ids).logits.float()
    write_tensors_json(out / "reference.json", tensors)
    print("wrote", out)


save(LlamaForCausalLM(LlamaConfig(**small, tie_word_embeddings=False, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64})), "tiny-llama")
save(Qwen2ForCausalLM(Qwen2Config(**small, tie_word_embeddings=True, rope_theta=1000000.0)), "tiny-qwen2")
save(LlamaForSequenceClassification(LlamaConfig(**small, num_labels=1, pad_token_id=0)), "tiny-llama-reward", scores=True)

gguf = home / "smollm2-135m-instruct-q4_1.gguf"
tokenizer = AutoTokenizer.from_pretrained(home, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(home, gguf_file=gguf.name, dtype=torch.float32).eval()
text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
prompt = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
with torch.no_grad():
    logits = model(input_ids=prompt).logits[0].float()
write_tensors_json(fixtures / "smollm2-logits.json",
                   {"input_ids": prompt, "logits_head": logits[:, :1024], "logits_last": logits[-1]})
print("wrote", fixtures / "smollm2-logits.json", "argmax", int(logits[-1].argmax()))
