//! The `magpie` binary: parse the command line, dispatch to the library, map errors to exit codes.

use magpie::cli::{self, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let result = cli::parse(std::env::args_os()).and_then(|cli| match &cli.command {
        Command::Synth(args) => magpie::synth::run(args),
        Command::Filter(args) => magpie::filter::run(args),
        Command::Sft(args) => magpie::train::sft(args),
        Command::Dpo(args) => magpie::train::dpo(args),
        Command::Inspect(args) => magpie::data::inspect::run(args),
        Command::Convert(args) => magpie::train::convert(args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
