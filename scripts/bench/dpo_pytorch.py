"""The PyTorch side of scripts/bench/dpo.sh: TRL's sigmoid DPO loss written out in plain PyTorch
(concatenated chosen + rejected forward, summed completion log-probs, reference log-probs computed
once beforehand) with torch.optim.AdamW, on the same model and the same 4 pairs as `magpie dpo`.
Prompts and completions are tokenised as magpie does (prompt with a generation prompt; completion
= what the full conversation adds). Prints JSON: first-step loss, pairs/s and tokens/s over the
steps after the first. With `lora`, the policy is PEFT's LoRA of the model (r 16, alpha 32 on
q_proj and v_proj, dropout 0 as TRL's DPO sets it) and AdamW trains only the adapters; the
reference, computed before the first step, is then the base model (B = 0).

    python scripts/bench/dpo_pytorch.py MODEL_DIR DATA.parquet STEPS BETA [lora]
"""
import json, sys
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from torch_loop import timed_steps

model_dir, data, steps, beta = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
if sys.argv[5:] == ["lora"]:
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
table = pq.read_table(data).to_pylist()


def side(prompt, completion):
    p_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + completion, tokenize=False)
    p = tok(p_text, add_special_tokens=False)["input_ids"]
    c = tok(full[len(p_text):].rstrip(), add_special_tokens=False)["input_ids"]
    return p + c, [-100] * len(p) + c


rows = [side(r["prompt"], r["chosen"]) for r in table] + [side(r["prompt"], r["rejected"]) for r in table]
width = max(len(r[0]) for r in rows)
ids = torch.tensor([r[0] + [tok.pad_token_id] * (width - len(r[0])) for r in rows])
labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
n = len(table)


def logps(m):
    logits = m(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != -100
    token = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (token * mask).sum(-1)


with torch.no_grad():
    ref = logps(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)


def dpo_loss():
    pol = logps(model)
    delta = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
    return -F.logsigmoid(beta * delta).mean()


losses, times = timed_steps(model, opt, dpo_loss, steps)
tokens = sum(len(r[0]) for r in rows)
print(json.dumps({"first_loss": losses[0], "losses": losses, "pairs_per_s": n * (steps - 1) / sum(times[1:]),
                  "tok_per_s": tokens * (steps - 1) / sum(times[1:]), "threads": torch.get_num_threads()}))
