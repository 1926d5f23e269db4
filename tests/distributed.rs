//! Data-parallel training through the real binary: two `magpie` processes on localhost, joined by
//! a Gloo process group from torchrun's environment variables, against one process at the same
//! global batch; and a rank killed mid-run. This is the code path NCCL takes on GPUs, on CPU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tch::Tensor;

mod common;
use common::{converted_smollm2, fixture, free_port, kill_once_exists, s, stderr};

fn command(args: &[&str], cache: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_magpie"));
    command.args(args).env("MAGPIE_CACHE", cache).env_remove("WORLD_SIZE").env_remove("SLURM_NTASKS");
    command
}

/// Starts rank `rank` of 2 as torchrun would.
fn spawn_rank(args: &[&str], rank: usize, port: u16, cache: &Path) -> Child {
    command(args, cache)
        .envs([("WORLD_SIZE", "2".to_string()), ("RANK", rank.to_string()), ("LOCAL_RANK", rank.to_string()),
               ("MASTER_ADDR", "127.0.0.1".to_string()), ("MASTER_PORT", port.to_string())])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Both ranks to the end; both must succeed.
fn two_ranks(args: &[&str], port: u16, cache: &Path) {
    let children: Vec<Child> = (0..2).map(|rank| spawn_rank(args, rank, port, cache)).collect();
    for (rank, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "rank {rank}: {}", stderr(&output));
    }
}

fn one_process(args: &[&str], cache: &Path) -> Output {
    let output = command(args, cache).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    output
}

/// Every logged loss, gradient norm and eval loss in metrics.jsonl, with its step.
fn losses(run: &Path) -> Vec<(u64, &'static str, f64)> {
    let mut out = vec![];
    for line in std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        for key in ["loss", "grad_norm", "eval_loss"] {
            if let Some(value) = row.get(key) {
                out.push((row["step"].as_u64().unwrap(), key, value.as_f64().unwrap()));
            }
        }
    }
    out
}

fn assert_same_losses(got: &Path, want: &Path) {
    let (got, want) = (losses(got), losses(want));
    assert_eq!(got.iter().map(|g| (g.0, g.1)).collect::<Vec<_>>(), want.iter().map(|w| (w.0, w.1)).collect::<Vec<_>>());
    for ((step, key, value), (_, _, wanted)) in got.iter().zip(&want) {
        assert!((value - wanted).abs() <= 1e-5 * wanted.abs().max(1.0), "step {step}: {key} {value} vs {wanted}");
    }
}

fn assert_same_weights(got: &Path, want: &Path) {
    let read = |p: &Path| -> HashMap<String, Tensor> { Tensor::read_safetensors(p.join("model/model.safetensors")).unwrap().into_iter().collect() };
    let (got, want) = (read(got), read(want));
    assert_eq!(got.len(), want.len());
    for (name, w) in &want {
        let diff = (&got[name] - w).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "{name}: weights differ by {diff}");
    }
}

/// SFT settings at a global batch of 4: `per_device` examples on each of `4 / per_device` ranks.
/// The fixture's 5 conversations split into 4 for training (every step one whole batch, so the
/// ranks never fill a short one up) and 1 for evaluation (which leaves rank 1 none). At lr 1e-4
/// the weights after 6 steps differ by up to 1.5e-5: the two ranks sum the gradient in another
/// order, and Adam turns that rounding in a near-zero gradient into up to lr a step. At 1e-5 the
/// weights agree to 1e-5 and the losses still move.
fn sft_args<'a>(model: &'a Path, data: &'a Path, out: &'a Path, per_device: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["sft", "--model", s(model), "-i", s(data), "-o", s(out), "--max-length", "64", "--per-device-train-batch-size", per_device,
        "--max-steps", "6", "--learning-rate", "1e-5", "--warmup-steps", "1", "--weight-decay", "0.1", "--eval-ratio", "0.2", "--eval-steps", "3",
        "--device", "cpu", "--ddp-timeout", "60"];
    args.extend_from_slice(extra);
    args
}

#[test]
fn two_gloo_ranks_train_as_one_process_and_a_killed_rank_resumes_to_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let (model, cache) = (converted_smollm2(dir.path()), dir.path().join("cache"));
    let data = fixture("magpie-released.parquet");
    let single = dir.path().join("single");
    one_process(&sft_args(&model, &data, &single, "4", &[]), &cache);
    // torchrun's world of one: a Gloo group of one and the sharded optimizer over it, the same
    // losses as no process group (what NCCL at world size 1 is checked against on a GPU).
    let group_of_one = dir.path().join("group-of-one");
    let one_port = free_port().to_string();
    let output = command(&sft_args(&model, &data, &group_of_one, "4", &[]), &cache)
        .envs([("WORLD_SIZE", "1"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", one_port.as_str())])
        .output()
        .unwrap();
    assert!(output.status.success() && stderr(&output).contains("rank 0 of 1"), "{}", stderr(&output));
    assert_same_losses(&group_of_one, &single);
    assert_same_weights(&group_of_one, &single);
    let sharded = dir.path().join("two-ranks");
    two_ranks(&sft_args(&model, &data, &sharded, "2", &["--save-steps", "2"]), free_port(), &cache);
    assert_same_losses(&sharded, &single);
    assert_same_weights(&sharded, &single);
    let checkpoint: Vec<String> = std::fs::read_dir(sharded.join("checkpoint-2")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    for shard in ["optimizer-rank0-of-2.safetensors", "optimizer-rank1-of-2.safetensors"] {
        assert!(checkpoint.contains(&shard.to_string()), "{checkpoint:?}");
    }

    // Rank 1 is killed after the step-2 checkpoint: rank 0 stops with an error naming the cause
    // (not the collective's time-out), and every checkpoint left is whole.
    let killed = dir.path().join("killed");
    let args = sft_args(&model, &data, &killed, "2", &["--save-steps", "2"]);
    let rendezvous = free_port();
    let mut ranks: Vec<Child> = (0..2).map(|rank| spawn_rank(&args, rank, rendezvous, &cache)).collect();
    kill_once_exists(&mut ranks[1], &killed.join("checkpoint-2/.magpie-manifest.json"), Duration::from_secs(600));
    let rank0 = ranks.remove(0).wait_with_output().unwrap();
    assert!(!rank0.status.success());
    assert!(stderr(&rank0).contains("rank 0 of 2") && stderr(&rank0).contains("another rank stopped"), "{}", stderr(&rank0));
    assert!(!killed.join("model").exists());
    for entry in std::fs::read_dir(&killed).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        if name.starts_with("checkpoint-") {
            assert!(killed.join(&name).join(".magpie-manifest.json").is_file(), "{name} is half-written");
        }
    }
    // Resuming with another number of processes is refused, naming the saved shards.
    let resume: Vec<&str> = args.iter().copied().chain(["--resume"]).collect();
    let output = command(&resume, &cache).output().unwrap();
    assert!(!output.status.success());
    assert!(stderr(&output).contains("optimizer-rank0-of-2.safetensors") && stderr(&output).contains("same number"), "{}", stderr(&output));
    // With the same number it ends as the uninterrupted run did.
    two_ranks(&resume, free_port(), &cache);
    assert_same_losses(&killed, &sharded);
    assert_same_weights(&killed, &sharded);
}

#[test]
fn dpo_over_two_gloo_ranks_with_split_reference_log_probs_matches_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let model = converted_smollm2(dir.path());
    let pairs = fixture("ultrafeedback-armorm.parquet");
    let run = |out: &PathBuf, per_device: &str| -> Vec<String> {
        ["dpo", "--model", s(&model), "-i", s(&pairs), "-o", s(out), "--max-length", "96", "--max-prompt-length", "48",
         "--per-device-train-batch-size", per_device, "--max-steps", "3", "--learning-rate", "1e-5", "--save-steps", "0",
         "--precompute-ref-log-probs", "--device", "cpu", "--ddp-timeout", "60"]
            .iter()
            .map(|a| a.to_string())
            .collect()
    };
    let single = dir.path().join("single");
    let args = run(&single, "4");
    // Separate caches: each run computes its reference log-probs (the two ranks split theirs).
    one_process(&args.iter().map(String::as_str).collect::<Vec<_>>(), &dir.path().join("cache-single"));
    let sharded = dir.path().join("two-ranks");
    let args = run(&sharded, "2");
    two_ranks(&args.iter().map(String::as_str).collect::<Vec<_>>(), free_port(), &dir.path().join("cache-two"));
    assert_same_losses(&sharded, &single);
    assert_same_weights(&sharded, &single);
    let cached = |name: &str| std::fs::read_dir(dir.path().join(name).join("dpo-reference-logps")).unwrap().count();
    assert_eq!((cached("cache-single"), cached("cache-two")), (1, 1), "rank 0 writes the cache");
}

/// LoRA over two ranks: the same losses and adapters as one process, and the optimizer shards
/// hold the adapters' state only (half each), not the frozen model's.
#[test]
fn lora_over_two_gloo_ranks_matches_one_process_and_shards_only_the_adapters_state() {
    let dir = tempfile::tempdir().unwrap();
    let (model, cache) = (converted_smollm2(dir.path()), dir.path().join("cache"));
    let data = fixture("magpie-released.parquet");
    // Dropout 0: each rank draws its own masks, which one process at twice the batch cannot repeat.
    let lora = ["--use-peft", "--lora-r", "4", "--lora-dropout", "0", "--lora-target-modules", "all-linear", "--save-steps", "3"];
    let single = dir.path().join("single");
    one_process(&sft_args(&model, &data, &single, "4", &lora), &cache);
    let sharded = dir.path().join("two-ranks");
    two_ranks(&sft_args(&model, &data, &sharded, "2", &lora), free_port(), &cache);
    assert_same_losses(&sharded, &single);
    let adapters = |run: &Path| -> HashMap<String, Tensor> {
        Tensor::read_safetensors(run.join("model/adapter_model.safetensors")).unwrap().into_iter().collect()
    };
    let (got, want) = (adapters(&sharded), adapters(&single));
    assert_eq!(got.len(), want.len());
    for (name, w) in &want {
        let diff = (&got[name] - w).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "{name}: adapters differ by {diff}");
    }
    let adapter_elements: i64 = want.values().map(|t| t.numel() as i64).sum();
    let moments: i64 = (0..2)
        .flat_map(|rank| Tensor::read_safetensors(sharded.join(format!("checkpoint-3/optimizer-rank{rank}-of-2.safetensors"))).unwrap())
        .filter(|(name, _)| name.starts_with("exp_avg."))
        .map(|(_, t)| t.numel() as i64)
        .sum();
    assert!(moments >= adapter_elements && moments <= adapter_elements + 64, "first moments of {moments} elements for {adapter_elements} adapter elements");
}
