//! `magpie filter`: tag, deduplicate, score and select rows (REFERENCE §3). Not yet implemented:
//! see issue #4.

use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct FilterArgs {
    /// YAML recipe whose keys are these flags' names; flags on the command line override it.
    #[arg(long, value_name = "FILE.yaml")]
    pub recipe: Option<PathBuf>,

    /// Input dataset(s): parquet files, directories of parts, or globs.
    #[arg(long, short)]
    pub input: Vec<String>,

    /// Output dataset: a `.parquet` file or a directory of parts.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

pub fn run(_args: &FilterArgs) -> Result<()> {
    bail!("`magpie filter` is not yet implemented (issue #4)")
}
