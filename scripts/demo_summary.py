"""Prints the demo's summary table: rows per stage, SFT/DPO metrics from metrics.jsonl, and the
eval win rates and grades from summary.json.

    python scripts/demo_summary.py out/demo SECONDS
"""
import json, pathlib, sys

root, seconds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
report = json.loads((root / "filtered.report.json").read_text())


def metrics(stage):
    return [json.loads(l) for l in (root / stage / "metrics.jsonl").read_text().splitlines()]


def evals(stage, key):
    return [(m["step"], m[key]) for m in metrics(stage) if key in m]


rows = [("synth rows", report["rows_in"])]
for step in report["steps"]:
    rows.append((f"  after {step['step']}", step["rows_out"]))
    if step["step"] == "reward_scores":
        rows.append(("  preference pairs", step["pairs"]))
print("\n== magpie demo summary")
for name, value in rows:
    print(f"{name:<28}{value:>10}")
sft_eval = evals("sft", "eval_loss")
print(f"{'sft eval loss (first, last)':<28}{sft_eval[0][1]:>10.4f}{sft_eval[-1][1]:>10.4f}" if sft_eval else "sft: no eval split")
for key in ["eval_rewards/accuracies", "eval_rewards/margins", "eval_loss"]:
    points = evals("dpo", key)
    if points:
        trail = "  ".join(f"{v:.3f}@{s}" for s, v in points)
        print(f"{'dpo ' + key:<28}{points[-1][1]:>10.4f}   over steps: {trail}")
for name, label in [("eval-sft", "sft vs base"), ("eval-dpo", "dpo vs sft")]:
    summary = json.loads((root / name / "summary.json").read_text())
    p, g = summary["pairwise"], summary["grade"]
    rate = "n/a" if p["win_rate"] is None else f"{p['win_rate']:.3f} (95% CI {p['win_rate_95ci'][0]:.3f}-{p['win_rate_95ci'][1]:.3f}, LC {p['length_controlled_win_rate']:.3f})"
    print(f"{label + ' win rate':<28}{rate}  W/T/L {p['wins']}/{p['ties']}/{p['losses']}, {p['unparsable']} unparsable")
    grade = "n/a" if g["mean"] is None else f"{g['mean']:.2f}"
    print(f"{label + ' mean grade':<28}{grade:>10}  ({g['graded']} graded, {g['unparsable']} unparsable; judge: 135M, a mechanism check)")
print(f"{'seconds after set-up':<28}{seconds:>10}")
print("plots: out/demo/sft/loss.png, out/demo/dpo/loss.png, out/demo/dpo/rewards.png, out/demo/eval-*/pairwise.png, grades.png")
