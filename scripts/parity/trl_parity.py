#!/usr/bin/env python3
"""Live parity of `magpie dpo` and `magpie sft` with TRL 1.16's DPOTrainer and SFTTrainer, full and LoRA.

    trl_parity.py --magpie BIN --tokenizer-dir DIR --work DIR

DIR (--tokenizer-dir) is a Hugging Face folder made by `magpie convert` (SmolLM2's tokenizer.json,
tokenizer_config.json and chat template). The script:

1. builds a tiny random Llama in f32 (SmolLM2's 49,152-token vocabulary, hidden 64, 2 layers,
   4 heads / 2 kv heads, tied embeddings, pad_token_id 2 = `<|im_end|>` as in SmolLM2's config),
   initializer_range 0.2 (at transformers' 0.02 the model is near uniform, entropy ~ ln V, and
   log-probs barely depend on which token is the target), seeded, and saves it with the tokenizer
   files, so both sides load one folder. transformers initialises the pad row of `embed_tokens`
   to zeros; it is refilled with random values, as a real checkpoint's `<|im_end|>` row is.
   magpie reads transformers 5's `rope_parameters`; no flat `rope_theta` is added.
2. writes the data as parquet, in shapes both read unchanged:
   - dpo.parquet: 6 conversational pairs, `prompt` / `chosen` / `rejected` as lists of messages;
     two prompts have a system message, one is multi-turn (an assistant turn inside the prompt).
   - sft.parquet: 6 `messages` conversations, two with a system message, two with two assistant
     turns.
3. trains 2 steps on each side and compares every metric both log, at every step, to a relative
   1e-5 (an absolute 1e-7 near 0): loss, grad_norm (before clipping), learning rate, the number
   of tokens seen (TRL's cumulative `num_tokens`, magpie's per-step `tokens` summed: a check on
   the tokenisation), and for DPO rewards/{chosen,rejected,accuracies,margins},
   logps/{chosen,rejected}, logits/{chosen,rejected}. TRL's `entropy` and `mean_token_accuracy`
   are printed for information (magpie does not log them). Exits 1 naming each mismatch.

Settings, the same on both sides: CPU, f32, one thread; lr 1e-3, constant schedule, no warmup,
weight decay 0, max_grad_norm 1.0 (clipping acts at every step: the norms are 1.7 to 8.3),
AdamW (0.9, 0.999, 1e-8), seed 42, max_steps 2, one batch holding every row (6 pairs or 6
conversations, gradient accumulation 1), so each step sees all rows and magpie's seeded shuffle
(src/train/trainer.rs `epoch_order`) and TRL's sampler cannot differ in what a step trains on. DPO: sigmoid loss,
beta 0.1, a live reference model (the starting weights), max_length 1024 (TRL 1.16 has no
max_prompt_length; magpie's is set to 1024 so it never cuts). TRL's dropout is 0 in the config.

LoRA (PEFT 0.21). The same two runs again with a PEFT LoRA adapter (r 4, alpha 8, dropout 0,
all-linear) made here with random B values (a fresh adapter's B is 0, and A's initial values
come from each side's own random stream), saved with PEFT's `save_pretrained`: TRL trains a
`PeftModel.from_pretrained(..., is_trainable=True)` of it (its DPO reference is then a frozen copy
of that adapter, TRL's "ref" adapter), magpie runs with `--adapter` on the same folder. Every
metric is compared as above. Then magpie's saved adapters are loaded with
`PeftModel.from_pretrained` and give the logits of TRL's trained model (1e-4 relative), and
`magpie merge` of magpie's SFT adapter loads in transformers and gives the logits of the
unmerged PEFT model (1e-5 relative).

The SFT loss mask. magpie sft trains on the assistant turns of `messages`, every turn, each
turn's content and its end-of-turn token `<|im_end|>`, not the newline the template writes after
it (src/model/tokenize.rs `conversation`). TRL's way to the same is `assistant_only_loss=True`,
which needs `{% generation %}` markers; SmolLM2's template has none and TRL ships no training
variant of it (`get_training_chat_template` refuses it), so TRL is given SmolLM2's template with
markers around `content + '<|im_end|>'` (checked here to render every conversation exactly as the
original does). Note that TRL's own ChatML training templates (trl/chat_templates/
qwen2_5_training.jinja) also mark the newline after `<|im_end|>`, and that TRL's prompt/completion
SFT (completion_only_loss) trains on it as well; magpie's DPO completions include it too.

No assistant text here starts with whitespace: where it does, BPE can merge it with the newline
that ends the `<|im_start|>assistant` header (`"\n "`, `"\n\n"`), and TRL, which tokenises the
whole conversation and splits at the first differing token, trains on that merged token while
magpie does not (it tokenises prompt and completion apart, and marks only tokens that start
inside an assistant span): a known difference, not pinned here.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

SEED = 42
STEPS = 2
LR = 1e-3
BETA = 0.1
MAX_LENGTH = 1024
MAX_GRAD_NORM = 1.0
INIT_STD = 0.2  # transformers' 0.02 leaves the model near uniform (entropy ~ln V), blind to which token is a target
REL_TOL, ABS_TOL = 1e-5, 1e-7
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def msg(role, content):
    return {"role": role, "content": content}


PAIRS = [
    {"prompt": [msg("system", "You are a terse geography tutor."), msg("user", "What is the capital of France?")],
     "chosen": [msg("assistant", "Paris.")], "rejected": [msg("assistant", "Lyon, I think.")]},
    {"prompt": [msg("user", "Pick a number between 1 and 10."), msg("assistant", "7."), msg("user", "Now double it.")],
     "chosen": [msg("assistant", "14.")], "rejected": [msg("assistant", "It is 12, I believe.")]},
    {"prompt": [msg("user", "Translate 'thank you' into Spanish.")],
     "chosen": [msg("assistant", "Gracias.")], "rejected": [msg("assistant", "Merci beaucoup.")]},
    {"prompt": [msg("user", "Is 17 a prime number?")],
     "chosen": [msg("assistant", "Yes, 17 is prime.")], "rejected": [msg("assistant", "No, it is divisible by 3.")]},
    {"prompt": [msg("system", "Answer in one word."), msg("user", "What is the opposite of hot?")],
     "chosen": [msg("assistant", "Cold.")], "rejected": [msg("assistant", "Warm, mostly.")]},
    {"prompt": [msg("user", "Write a haiku about rain.")],
     "chosen": [msg("assistant", "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky")],
     "rejected": [msg("assistant", "Rain is wet.")]},
]

CONVERSATIONS = [
    [msg("system", "You are a helpful assistant."), msg("user", "Name a primary colour."), msg("assistant", "Red.")],
    [msg("user", "Hi there"), msg("assistant", "Hello! How can I help?"), msg("user", "Add 2 and 3."), msg("assistant", "5")],
    [msg("user", "What is the boiling point of water at sea level?"), msg("assistant", "100 degrees Celsius.")],
    [msg("system", "Reply in French."), msg("user", "Good morning"), msg("assistant", "Bonjour !"),
     msg("user", "And good night?"), msg("assistant", "Bonne nuit.")],
    [msg("user", "Give me a synonym for happy."), msg("assistant", "Joyful.")],
    [msg("user", "Write one line about the sea."), msg("assistant", "The sea keeps every secret the shore forgets.")],
]

BATCH = 6  # every row in the one batch of each step
assert len(PAIRS) == len(CONVERSATIONS) == BATCH

# SmolLM2's chat template with TRL's assistant-mask markers around what magpie trains on.
MARKED_SMOLLM2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_model(tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, attention_dropout=0.0, initializer_range=INIT_STD,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # a trained checkpoint's pad (= end-of-turn) row is not zero
        embed = model.model.embed_tokens.weight
        embed[config.pad_token_id] = torch.randn(embed.shape[1], generator=torch.Generator().manual_seed(SEED)) * INIT_STD
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def write_parquet(rows, path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def read_parquet(path: Path):
    import pyarrow.parquet as pq
    from datasets import Dataset

    return Dataset.from_list(pq.read_table(path).to_pylist())


def recorder():
    """A TrainerCallback that keeps every per-step log line (TRL's metrics merged in), by step."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.steps = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "train_runtime" not in logs:
                self.steps.setdefault(state.global_step, {}).update(logs)

    return Recorder()


def common_args():
    return dict(
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, seed=SEED, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, fp16=False, disable_tqdm=True, dataloader_num_workers=0, max_length=MAX_LENGTH,
    )


LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
PROBE_IDS = [[1, 28, 905, 314, 2914, 30, 2, 198, 17, 4500, 9, 77]]


def build_adapter(model_dir: Path, out: Path) -> Path:
    """A PEFT LoRA adapter on the model with random B values (so it changes the model), saved."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(task_type="CAUSAL_LM", **LORA))
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    return out


def peft_model(model_dir: Path, adapter: Path, trainable: bool):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter, is_trainable=trainable)


def logits_of(model):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROBE_IDS)).logits.double()


def relative_difference(a, b):
    return float((a - b).abs().max() / max(float(a.abs().max()), 1e-30))


def model_or_path(model_dir: Path, adapter):
    """What the trainers are given: the folder (they load it in f32), or a trainable PeftModel."""
    if adapter is None:
        return str(model_dir), {"model_init_kwargs": {"dtype": "float32"}}
    return peft_model(model_dir, adapter, trainable=True), {}


def run_trl_dpo(model_dir: Path, data: Path, out: Path, adapter=None):
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model, init = model_or_path(model_dir, adapter)
    args = DPOConfig(output_dir=str(out), beta=BETA, loss_type=["sigmoid"], **init, **common_args())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    log = recorder()
    trainer = DPOTrainer(model=model, args=args, train_dataset=read_parquet(data), processing_class=tokenizer,
                         callbacks=[log])
    first = trainer.train_dataset[0]
    print(f"TRL dpo: pair 0 completion tokens decode to {tokenizer.decode(first['chosen_ids'])!r}")
    trainer.train()
    return log.steps, trainer.model


def run_trl_sft(model_dir: Path, data: Path, out: Path, adapter=None):
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for conversation in CONVERSATIONS:  # the markers change nothing in what is rendered
        for prompt in (False, True):
            want = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
            got = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt,
                                                chat_template=MARKED_SMOLLM2_TEMPLATE)
            assert want == got, f"the marked template renders differently:\n{want!r}\n{got!r}"
    tokenizer.chat_template = MARKED_SMOLLM2_TEMPLATE
    model, init = model_or_path(model_dir, adapter)
    args = SFTConfig(output_dir=str(out), assistant_only_loss=True, packing=False, **init, **common_args())
    log = recorder()
    trainer = SFTTrainer(model=model, args=args, train_dataset=read_parquet(data), processing_class=tokenizer,
                         callbacks=[log])
    first = trainer.train_dataset[1]
    trained = [label for label in first["labels"] if label != -100]
    print(f"TRL sft: conversation 1 trains on {tokenizer.decode(trained)!r}")
    trainer.train()
    return log.steps, trainer.model


def run_magpie(binary: str, command: str, model_dir: Path, data: Path, out: Path, extra=()):
    argv = [binary, command, "--model", str(model_dir), "-i", str(data), "-o", str(out), "--device", "cpu",
            "--learning-rate", str(LR), "--lr-scheduler-type", "constant", "--warmup-steps", "0",
            "--weight-decay", "0", "--max-grad-norm", str(MAX_GRAD_NORM), "--max-steps", str(STEPS),
            "--per-device-train-batch-size", str(BATCH), "--gradient-accumulation-steps", "1", "--seed", str(SEED),
            "--save-steps", "0", "--logging-steps", "1", "--max-length", str(MAX_LENGTH)]
    if command == "dpo":
        argv += ["--beta", str(BETA), "--loss-type", "sigmoid", "--max-prompt-length", str(MAX_LENGTH)]
    argv += list(extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print("$ " + " ".join(argv), flush=True)
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"magpie {command} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps, seen = {}, 0
    for row in sorted((r for r in rows if "loss" in r), key=lambda r: r["step"]):
        seen += row.get("tokens", math.nan)
        steps[row["step"]] = dict(row, num_tokens=seen, learning_rate=row.get("lr"))
    return steps


COMPARED = {
    "dpo": ["loss", "grad_norm", "learning_rate", "num_tokens", "rewards/chosen", "rewards/rejected",
            "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
            "logits/rejected"],
    "sft": ["loss", "grad_norm", "learning_rate", "num_tokens"],
}
TRL_ONLY = ["entropy", "mean_token_accuracy"]


def close(a, b):
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= max(ABS_TOL, REL_TOL * max(abs(a), abs(b)))


def compare(name, trl, magpie, keys=None):
    keys = keys or COMPARED[name]
    failures = []
    print(f"\n{name}: {'step':>4}  {'metric':<20} {'TRL 1.16':>16} {'magpie':>16} {'rel diff':>10}")
    for step in range(1, STEPS + 1):
        t, m = trl.get(step, {}), magpie.get(step, {})
        for key in keys:
            a, b = t.get(key), m.get(key)
            if a is None or b is None:
                failures.append(f"{name} step {step} {key}: TRL {a}, magpie {b} (not logged)")
                print(f"{name}: {step:>4}  {key:<20} {a!s:>16} {b!s:>16}  MISSING")
                continue
            rel = abs(a - b) / max(abs(a), abs(b), 1e-30)
            ok = close(a, b)
            print(f"{name}: {step:>4}  {key:<20} {a:>16.8g} {b:>16.8g} {rel:>10.2e}  {'ok' if ok else 'MISMATCH'}")
            if not ok:
                failures.append(f"{name} step {step} {key}: TRL {a!r}, magpie {b!r} (relative difference {rel:.3g})")
        info = "  ".join(f"{k} {t[k]:.6g}" for k in TRL_ONLY if k in t)
        print(f"{name}: {step:>4}  (TRL only: {info})")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--magpie", help="the magpie binary (omit with --trl-only)")
    parser.add_argument("--tokenizer-dir", required=True, type=Path, help="a `magpie convert` output folder")
    parser.add_argument("--work", required=True, type=Path, help="scratch folder (emptied first)")
    parser.add_argument("--trl-only", action="store_true", help="run and print the TRL side only")
    args = parser.parse_args()
    if not args.trl_only and not args.magpie:
        parser.error("--magpie is required (or --trl-only)")
    os.environ.setdefault("HF_HOME", str(args.work / "hf-home"))

    import torch
    torch.set_num_threads(1)
    import peft, transformers, trl
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}")
    if not trl.__version__.startswith("1.16."):
        sys.exit(f"expected TRL 1.16, found {trl.__version__} (scripts/test-requirements.txt pins it)")

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model_dir = build_model(args.tokenizer_dir, args.work / "model")
    write_parquet(PAIRS, args.work / "dpo.parquet")
    write_parquet([{"messages": m} for m in CONVERSATIONS], args.work / "sft.parquet")

    adapter = build_adapter(model_dir, args.work / "adapter")
    runs = {"dpo": run_trl_dpo, "sft": run_trl_sft}
    trl_runs, trl_models = {}, {}
    for name, run in runs.items():
        trl_runs[name], _ = run(model_dir, args.work / f"{name}.parquet", args.work / f"trl-{name}")
        trl_runs[f"{name}-lora"], trl_models[name] = run(model_dir, args.work / f"{name}.parquet", args.work / f"trl-{name}-lora", adapter)
    if args.trl_only:
        print(json.dumps(trl_runs, indent=1))
        return
    failures = []
    for name in ("dpo", "sft"):
        ours = run_magpie(args.magpie, name, model_dir, args.work / f"{name}.parquet", args.work / f"magpie-{name}")
        failures += compare(name, trl_runs[name], ours)
        lora_out = args.work / f"magpie-{name}-lora"
        ours = run_magpie(args.magpie, name, model_dir, args.work / f"{name}.parquet", lora_out, ["--adapter", str(adapter)])
        failures += compare(f"{name}-lora", trl_runs[f"{name}-lora"], ours, COMPARED[name])
        # magpie's adapter in PEFT against TRL's trained PEFT model.
        ours_in_peft = logits_of(peft_model(model_dir, lora_out / "model", trainable=False))
        rel = relative_difference(ours_in_peft, logits_of(trl_models[name]))
        print(f"{name}-lora: magpie's saved adapter in PEFT vs TRL's trained model: logits relative difference {rel:.2e}")
        if not rel <= 1e-4:
            failures.append(f"{name}-lora: magpie's adapter loaded in PEFT gives logits {rel:.3g} (relative) from TRL's")
        if name == "sft":
            merged = args.work / "magpie-sft-merged"
            done = subprocess.run([args.magpie, "merge", "--base", str(model_dir), "--adapter", str(lora_out / "model"), "-o", str(merged)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"magpie merge failed ({done.returncode}):\n{done.stderr[-4000:]}")
            from transformers import AutoModelForCausalLM
            import torch
            rel = relative_difference(logits_of(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)), ours_in_peft)
            print(f"sft-lora: magpie merge in transformers vs the unmerged adapter in PEFT: logits relative difference {rel:.2e}")
            if not rel <= 1e-5:
                failures.append(f"sft-lora: the merged model's logits are {rel:.3g} (relative) from the unmerged adapter's")
    if failures:
        print(f"\n{len(failures)} mismatches with TRL {trl.__version__}:")
        print("\n".join("  " + f for f in failures))
        sys.exit(1)
    print(f"\nevery metric of magpie dpo and sft, full and LoRA, matches TRL {trl.__version__} at every step")


if __name__ == "__main__":
    main()
