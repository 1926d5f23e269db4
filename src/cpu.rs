//! What this CPU can run. The release build is native to the CPU it was built on
//! (.cargo/config.toml), and build.rs records that CPU's flags. A binary from a cache built on
//! another machine would die with SIGILL at the first instruction this CPU lacks; `ensure_supported`
//! stops it first with an error that says how to rebuild.

use anyhow::{bail, Result};
use std::collections::BTreeSet;

/// The /proc/cpuinfo flags that name instruction sets a compiler may emit. scripts/env.sh keys
/// the cargo target dir by the same list.
pub const ISA_FLAG_PREFIXES: &[&str] = &[
    "sse", "ssse", "avx", "amx", "fma", "f16c", "bmi", "vaes", "vpclmulqdq", "gfni", "sha_ni", "aes", "pclmulqdq", "popcnt",
    "movbe", "abm", "adx", "xsave",
];

/// The instruction-set flags in a /proc/cpuinfo `flags` line.
pub fn isa_flags(flags_line: &str) -> BTreeSet<String> {
    flags_line
        .split_whitespace()
        .filter(|f| ISA_FLAG_PREFIXES.iter().any(|p| f.starts_with(p)))
        .map(str::to_string)
        .collect()
}

/// The flags line of the CPU the binary was built on (empty where /proc/cpuinfo had none).
pub fn built_for() -> &'static str {
    env!("MAGPIE_BUILD_CPU_FLAGS")
}

/// This CPU's model name and flags line, from /proc/cpuinfo (`None` off Linux x86).
pub fn this_cpu() -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let field = |key: &str| {
        info.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string())
    };
    Some((field("model name").unwrap_or_else(|| "unknown CPU".into()), field("flags")?))
}

/// Instruction sets the binary was built with that `current_flags` lacks.
pub fn missing(built_flags: &str, current_flags: &str) -> Vec<String> {
    let current = isa_flags(current_flags);
    isa_flags(built_flags).into_iter().filter(|f| !current.contains(f)).collect()
}

/// Fails when this CPU lacks an instruction set the binary was built for.
pub fn ensure_supported() -> Result<()> {
    let Some((_, flags)) = this_cpu() else { return Ok(()) };
    let lacking = missing(built_for(), &flags);
    if !lacking.is_empty() {
        bail!(
            "this magpie was built for another CPU: this one lacks {}. Run scripts/setup.sh, which builds for this CPU \
             in its own target dir (or build with `cargo build --release` here)",
            lacking.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_built_with_avx512_is_refused_on_an_avx2_cpu() {
        let built = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f avx512bw amx_tile hypervisor";
        let avx2_only = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma constant_tsc";
        assert_eq!(missing(built, avx2_only), ["amx_tile", "avx512bw", "avx512f"]);
        // Flags that are no instruction set (hypervisor, constant_tsc) never count.
        assert!(missing(avx2_only, built).is_empty());
    }

    #[test]
    fn this_binary_runs_on_the_cpu_that_built_it() {
        let (_, flags) = this_cpu().expect("tests run on Linux");
        assert!(!isa_flags(built_for()).is_empty(), "build.rs recorded no CPU flags");
        assert_eq!(missing(built_for(), &flags), Vec::<String>::new());
        ensure_supported().unwrap();
    }
}
