"""Writes the small committed fixtures under data/fixtures/ with pyarrow, in the shapes users
already have, so magpie's readers are tested against files another writer produced.

    .venv/bin/pip install pyarrow && .venv/bin/python scripts/make_fixtures.py

- magpie-released.parquet: Magpie's released SFT shape (`conversations` [{from, value}], the
  generation config struct, the tag columns, large_string text as polars/datasets may write it).
- ultrafeedback-armorm.parquet: the seed's DPO data shape (string `prompt`, whole-conversation
  `chosen` / `rejected`, `all_rm_scores`).
"""
import pathlib
import pyarrow as pa
import pyarrow.parquet as pq

out = pathlib.Path(__file__).resolve().parent.parent / "data" / "fixtures"
out.mkdir(parents=True, exist_ok=True)

rows = [
    ("How do I reverse a list in Python?", "Use `my_list[::-1]` for a reversed copy, or `my_list.reverse()` to reverse in place.", "Coding & Debugging", "easy", "good", 3.25),
    ("Write a haiku about autumn rain.", "Cold rain on the eaves\nred leaves drift into puddles\nthe gutter hums low", "Creative writing", "easy", "average", 1.5),
    ("What is the derivative of x^3 + 2x?", "The derivative is 3x^2 + 2.", "Math", "very easy", "excellent", 4.0),
    ("Plan a three-day trip to Lisbon on a budget.", "Day 1: Alfama and the castle. Day 2: Belém by tram 15. Day 3: a day trip to Sintra by train.", "Planning", "medium", "good", 2.75),
    ("Explain why the sky is blue.", "Sunlight scatters off air molecules; shorter blue wavelengths scatter most (Rayleigh scattering).", "Information seeking", "easy", "good", 3.0),
]
conversation = pa.list_(pa.struct([("from", pa.large_string()), ("value", pa.large_string())]))
config = pa.struct([("temperature", pa.float64()), ("top_p", pa.float64()), ("input_generator", pa.string()), ("seed", pa.null()), ("pre_query_template", pa.string())])
table = pa.table({
    "uuid": pa.array([f"00000000-0000-4000-8000-00000000000{i}" for i in range(len(rows))], pa.large_string()),
    "model": ["meta-llama/Meta-Llama-3-70B-Instruct"] * len(rows),
    "gen_input_configs": pa.array([{"temperature": 1.0, "top_p": 1.0, "input_generator": "meta-llama/Meta-Llama-3-70B-Instruct", "seed": None, "pre_query_template": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"}] * len(rows), config),
    "instruction": pa.array([r[0] for r in rows], pa.large_string()),
    "response": pa.array([r[1] for r in rows], pa.large_string()),
    "conversations": pa.array([[{"from": "human", "value": r[0]}, {"from": "gpt", "value": r[1]}] for r in rows], conversation),
    "task_category": [r[2] for r in rows],
    "other_task_category": pa.array([["Information seeking"]] * len(rows), pa.list_(pa.string())),
    "difficulty": [r[3] for r in rows],
    "input_quality": [r[4] for r in rows],
    "instruct_reward": pa.array([r[5] for r in rows], pa.float32()),
    "repeat_count": pa.array([0] * len(rows), pa.int32()),
    "language": ["EN"] * len(rows),
    "source_notes": ["carried through unchanged"] * len(rows),
})
pq.write_table(table, out / "magpie-released.parquet")

message = pa.struct([("content", pa.string()), ("role", pa.string())])
prompts = ["Name a prime number greater than 10.", "Translate 'good morning' into French."]
chosen = ["11 is a prime number greater than 10.", "Bonjour."]
rejected = ["10 is prime.", "Buenos días."]
prefs = pa.table({
    "prompt_id": ["p0", "p1"],
    "prompt": prompts,
    "all_generated_responses": [[c, r] for c, r in zip(chosen, rejected)],
    "all_rm_scores": [[0.9, 0.1], [0.8, 0.2]],
    "chosen": pa.array([[{"content": p, "role": "user"}, {"content": c, "role": "assistant"}] for p, c in zip(prompts, chosen)], pa.list_(message)),
    "rejected": pa.array([[{"content": p, "role": "user"}, {"content": r, "role": "assistant"}] for p, r in zip(prompts, rejected)], pa.list_(message)),
})
pq.write_table(prefs, out / "ultrafeedback-armorm.parquet")
print("wrote", sorted(p.name for p in out.glob("*.parquet")))
