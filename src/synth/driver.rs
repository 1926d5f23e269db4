//! The whole `magpie synth` run for one shard: the model and its engine, the output claimed
//! (or found finished), the shard's chunks that are not done yet, each generated (harvesting) or
//! answered (`--input`) and written as it finishes, progress in tok/s, and the summary.

use super::answer::{self, InputRows};
use super::pipeline::{Stats, Synthesizer};
use super::rows;
use super::SynthPlan;
use crate::data::chunks::{ChunkedOutput, Shard};
use crate::engine::{self, lookup as model};
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::time::Instant;

/// The whole `magpie synth` run for this shard.
pub fn run(plan: &SynthPlan) -> Result<()> {
    let (args, output, shard) = (plan.flags, plan.output.as_path(), plan.shard);
    let info = model::resolve(args.model.as_deref())?.or_family_template(Some(&args.template), "synth")?;
    let engine = engine::open(&info.path, &plan.engine)?;
    let mut synth = Synthesizer::new(args, &info, engine)?;
    let source = if args.input.is_empty() { None } else { Some(InputRows::read(&args.input)?) };
    let mut inputs = vec![info.path.clone()];
    inputs.extend(source.iter().flat_map(|s| s.files().iter().cloned()));
    let input_files = source.as_ref().map(InputRows::identity);
    let settings = serde_json::json!({ "model": info.path, "engine": synth.engine.name(), "args": args, "input_files": input_files });
    let Some(checkpoint) = ChunkedOutput::open(output, &inputs, "synth", &settings, args.run.overwrite)? else {
        println!("synth: {} is already finished with these settings; nothing to do", output.display());
        return Ok(());
    };

    let chunk_rows = args.chunk_rows as u64;
    let num = source.as_ref().map_or(args.num, InputRows::rows) as u64;
    let all_chunks = num.div_ceil(chunk_rows) as usize;
    let chunks: Vec<usize> = shard.chunks(all_chunks).collect();
    let rows_of = |c: usize| (c as u64 * chunk_rows)..((c as u64 + 1) * chunk_rows).min(num);
    let todo: Vec<usize> = chunks.iter().copied().filter(|&c| !checkpoint.is_done(c)).collect();
    let shard_rows: u64 = chunks.iter().map(|&c| rows_of(c).end - rows_of(c).start).sum();
    let done_rows: u64 = chunks.iter().filter(|c| !todo.contains(c)).map(|&c| rows_of(c).end - rows_of(c).start).sum();

    let bar = ProgressBar::new(shard_rows);
    bar.set_style(ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} rows  {msg}  ETA {eta}")?.progress_chars("=> "));
    bar.set_position(done_rows);
    if done_rows > 0 {
        bar.println(format!("resuming: {} of {} chunks already in {}", chunks.len() - todo.len(), chunks.len(), output.display()));
    }
    let run_info = synth.run_info();
    let started = Instant::now();
    let mut tokens = 0u64;
    let mut input_chunks = source.as_ref().map(InputRows::chunks);
    for chunk in todo {
        let range = rows_of(chunk);
        let size = range.end - range.start;
        let mut on_tokens = |n: usize| {
            tokens += n as u64;
            bar.set_message(format!("{:.0} tok/s", tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)));
        };
        let batch = match &mut input_chunks {
            None => rows::to_batch(&synth.chunk(range, &mut on_tokens)?, &run_info),
            Some(input_chunks) => {
                let mut skipped = 0;
                let batch = answer::answer(input_chunks, &mut synth, range, &run_info, &mut on_tokens, &mut skipped)?;
                synth.stats.no_user_turn += skipped;
                batch
            }
        };
        checkpoint.write(chunk, &batch)?;
        synth.stats.rows_written += batch.num_rows() as u64;
        bar.inc(size);
    }
    bar.finish_and_clear();
    print_summary(&synth.stats, shard, started.elapsed().as_secs_f64(), output);
    if !checkpoint.finish_if_complete(all_chunks)? {
        println!("  other shards' chunks are still missing; the dataset is finished when the last shard is done");
    }
    Ok(())
}

fn print_summary(stats: &Stats, shard: Shard, seconds: f64, output: &Path) {
    println!("synth summary (shard {}/{}) -> {}", shard.index, shard.count, output.display());
    println!("  instructions attempted  {}", stats.attempted);
    if stats.no_user_turn > 0 {
        println!("  skipped (no user turn)  {}", stats.no_user_turn);
    }
    println!("  rows written            {}", stats.rows_written);
    println!("  dropped (empty)         {}", stats.dropped_empty);
    println!("  truncated instructions  {}", stats.truncated_instructions);
    if stats.redrawn_banned_starts > 0 {
        println!("  banned first tokens     {} redrawn, {} kept after {} draws", stats.redrawn_banned_starts, stats.kept_banned_starts, super::pipeline::BAN_REDRAWS);
    }
    println!("  truncated responses     {}", stats.truncated_responses);
    println!("  empty responses         {}", stats.empty_responses);
    println!("  conversations cut short {}", stats.short_conversations);
    println!("  prompt tokens           {}", stats.prompt_tokens);
    println!("  generated tokens        {}", stats.generated_tokens);
    println!("  seconds                 {seconds:.1}");
    println!("  generated tok/s         {:.1}", stats.generated_tokens as f64 / seconds.max(1e-9));
}
