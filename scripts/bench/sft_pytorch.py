"""The PyTorch side of scripts/bench/sft.sh: a plain transformers + torch.optim.AdamW loop on the
same model directory and the same 4 conversations, tokenised as magpie does (chat template,
assistant-only labels including end-of-turn tokens, truncated to MAX_LENGTH keeping the start).
Prints JSON: first-step loss and tokens/s over the steps after the first. With `lora`, the model
is PEFT's LoRA of it (r 16, alpha 32, dropout 0.05 on q_proj and v_proj: TRL's and magpie's
defaults) and AdamW trains only the adapters.

    python scripts/bench/sft_pytorch.py MODEL_DIR DATA.parquet STEPS MAX_LENGTH [lora]
"""
import json, sys
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from torch_loop import timed_steps

model_dir, data, steps, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(42)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
if sys.argv[5:] == ["lora"]:
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"]))
model.train()


def encode(messages):
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            before = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
            through = tok.apply_chat_template(messages[: k + 1], tokenize=False).rstrip()
            spans.append((len(before), len(through)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    labels = [i if any(a <= s < b for a, b in spans) else -100 for i, (s, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


rows = [encode(list(m)) for m in pq.read_table(data).column("messages").to_pylist()]
ids = torch.tensor([r[0] for r in rows])
labels = torch.tensor([r[1] for r in rows])
decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=1e-5, betas=(0.9, 0.999), eps=1e-8, foreach=False)
losses, times = timed_steps(model, opt, lambda: model(input_ids=ids, labels=labels).loss, steps)
tokens = ids.numel()
print(json.dumps({"first_loss": losses[0], "losses": losses, "tok_per_s": tokens * (steps - 1) / sum(times[1:]),
                  "threads": torch.get_num_threads()}))
