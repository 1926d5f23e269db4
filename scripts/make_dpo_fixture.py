"""Writes data/fixtures/dpo-reference.json once: on a fixed batch of two preference pairs, the DPO
loss and TRL's metrics for every loss type, computed in PyTorch from transformers forwards of the
tiny fixtures (policy: tiny-llama, reference: tiny-qwen2; configs from make_llama_fixtures.py, weights
from scripts/tiny_models.py, as the Rust tests build them).
src/train/dpo.rs must agree to 1e-5 relative.

The formulas are TRL's DPOTrainer (concatenated forward, summed completion log-probs; `ipo`
length-normalises) and CPOTrainer's SimPO, as docs/upstream.md §5 lists them.

    .venv/bin/python scripts/make_dpo_fixture.py
"""
import json, pathlib
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from tiny_models import fill_deterministic

root = pathlib.Path(__file__).resolve().parent.parent
fixtures = root / "data" / "fixtures"
policy, reference = (fill_deterministic(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(fixtures / name))).eval()
                     for name in ["tiny-llama", "tiny-qwen2"])
pairs = [
    {"prompt": [1, 17, 200, 33], "chosen": [45, 9, 250, 3, 2], "rejected": [77, 128, 2]},
    {"prompt": [1, 99, 14, 15, 16, 7], "chosen": [201, 8, 2], "rejected": [9, 10, 11, 12, 13, 2]},
]
beta, label_smoothing, simpo_gamma = 0.1, 0.1, 0.5


def batch():
    rows = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    prompt_lens = [len(p["prompt"]) for p in pairs] * 2
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, prompt_lens)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, p : len(row)] = torch.tensor(row[p:])
        mask[i, : len(row)] = 1
    return ids, labels, mask


def stats(model, ids, labels, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    labels = labels[:, 1:]
    loss_mask = labels != -100
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (token_logps * loss_mask).sum(-1), loss_mask.sum(-1), logits, loss_mask


ids, labels, mask = batch()
n = len(pairs)
logps, lengths, logits, loss_mask = stats(policy, ids, labels, mask)
ref_logps, _, _, _ = stats(reference, ids, labels, mask)
results = {}
for loss_type in ["sigmoid", "ipo", "hinge", "robust", "simpo"]:
    eps = label_smoothing if loss_type in ("sigmoid", "robust", "simpo") else 0.0
    pc, pr, rc, rr, lc, lr = logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], lengths[:n], lengths[n:]
    if loss_type == "simpo":
        pc, pr = pc / lc, pr / lr
        z = pc - pr - simpo_gamma / beta
        losses = -F.logsigmoid(beta * z) * (1 - eps) - F.logsigmoid(-beta * z) * eps
        chosen_rewards, rejected_rewards = beta * pc, beta * pr
    else:
        if loss_type == "ipo":
            pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
        z = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            losses = -F.logsigmoid(beta * z) * (1 - eps) - F.logsigmoid(-beta * z) * eps
        elif loss_type == "hinge":
            losses = torch.relu(1 - beta * z)
        elif loss_type == "ipo":
            losses = (z - 1 / (2 * beta)) ** 2
        else:
            losses = (-F.logsigmoid(beta * z) * (1 - eps) + F.logsigmoid(-beta * z) * eps) / (1 - 2 * eps)
        chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    results[loss_type] = {
        "label_smoothing": eps,
        "loss": losses.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": logps[:n].mean().item(),
        "logps/rejected": logps[n:].mean().item(),
        "logits/chosen": logits[:n][loss_mask[:n]].mean().item(),
        "logits/rejected": logits[n:][loss_mask[n:]].mean().item(),
    }
out = fixtures / "dpo-reference.json"
out.write_text(json.dumps({"pairs": pairs, "beta": beta, "simpo_gamma": simpo_gamma, "results": results}, indent=1))
print("wrote", out)
