//! The `magpie` binary: parse the command line, dispatch to the library, map errors to exit codes.

mod cli;
mod recipe;

use cli::Command;
use std::process::ExitCode;

fn main() -> ExitCode {
    // First, before any code built for this CPU's instruction sets can run into one it lacks.
    let doctor = std::env::args().nth(1).is_some_and(|a| a == "doctor");
    let result = (if doctor { Ok(()) } else { magpie::cpu::ensure_supported() })
        .and_then(|()| cli::parse(std::env::args_os()))
        .and_then(|cli| match &cli.command {
            Command::Synth(args) => magpie::synth::run(args),
            Command::Filter(args) => magpie::filter::run(args),
            Command::Sft(args) => magpie::train::sft(args),
            Command::Dpo(args) => magpie::train::dpo(args),
            Command::Eval(args) => magpie::eval::run(args),
            Command::Inspect(args) => magpie::data::inspect::run(args),
            Command::Convert(args) => magpie::model::convert::run(args),
            Command::Merge(args) => magpie::model::merge::run(args),
            Command::Doctor(args) => magpie::doctor::run(args),
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => match error.downcast_ref::<clap::Error>() {
            // Usage errors, --help and --version print as clap prints them (exit 2, or 0).
            Some(usage) => {
                let _ = usage.print();
                ExitCode::from(usage.exit_code() as u8)
            }
            None => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}
