//! `magpie doctor`: what this machine has, for a user or a bug report. Each line is a check with
//! ✓ or ✗ and, where it fails, the fix. The exit code is non-zero when something the demo needs
//! is missing (a binary built for another CPU, AMX kernels in llama.cpp, the default models).

use crate::{cpu, home};
use anyhow::{bail, Result};
use std::path::Path;

#[derive(clap::Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Also check this OpenAI-compatible server: the models it lists, a one-token completion,
    /// and whether it takes token-id prompts.
    #[command(flatten)]
    pub server: crate::engine::openai::ServerFlags,

    /// With `--base-url`: the local tokenizer of the served model (default: the embedded SmolLM2).
    #[arg(long, requires = "base_url")]
    pub model: Option<std::path::PathBuf>,
}

/// One line of the report.
#[derive(Debug)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// Whether the demo needs this check to pass (a failing optional check only informs).
    pub needed: bool,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: String) -> Check {
        Check { name, ok: true, needed: true, detail, fix: None }
    }

    fn fail(name: &'static str, detail: String, fix: &str) -> Check {
        Check { name, ok: false, needed: true, detail, fix: Some(fix.to_string()) }
    }

    fn optional(mut self) -> Check {
        self.needed = false;
        self
    }
}

pub fn run(args: &DoctorArgs) -> Result<()> {
    let mut checks = checks(&home::magpie_home(), &home::cache_dir());
    if let Some(server) = args.server.options() {
        checks.push(server_check(&server, args.model.as_deref()));
    }
    for check in &checks {
        println!("{} {:<10} {}", if check.ok { "✓" } else { "✗" }, check.name, check.detail);
        if let (false, Some(fix)) = (check.ok, &check.fix) {
            println!("  {:<10} fix: {fix}", "");
        }
    }
    let failed: Vec<&str> = checks.iter().filter(|c| c.needed && !c.ok).map(|c| c.name).collect();
    if !failed.is_empty() {
        bail!("doctor: {} failed", failed.join(", "));
    }
    Ok(())
}

/// `--base-url`: connecting runs the engine's own probes (models, a one-token completion as text,
/// then as token ids).
fn server_check(server: &crate::engine::openai::ServerOptions, model: Option<&Path>) -> Check {
    let connected = crate::engine::lookup::resolve(model).and_then(|info| crate::engine::openai::OpenAi::connect(&info.path, server, 1));
    match connected {
        Ok(engine) => {
            let prompts = if engine.takes_token_ids() { "token-id prompts accepted" } else { "token-id prompts refused: text prompts, tokenised by the server" };
            Check::pass("server", format!("{} serves `{}`; a one-token completion answered; {prompts}", server.base_url, engine.model()))
        }
        Err(e) => Check::fail("server", format!("{e:#}"), "check --base-url, --server-model and the key in --api-key-env"),
    }
}

/// Every check, with the models looked up in `models` and the cache sized in `cache`.
pub fn checks(models: &Path, cache: &Path) -> Vec<Check> {
    vec![
        cpu_check(),
        build_check(),
        ggml_check(),
        libtorch_check(),
        cuda_check(),
        model_check("model", &models.join(home::DEFAULT_MODEL_FILE), "the default generation model"),
        model_check("encoder", &models.join(home::DEFAULT_EMBEDDING_MODEL_DIR), "the sentence encoder for semantic dedup"),
        cache_check(cache),
    ]
}

fn cpu_check() -> Check {
    let Some((name, flags)) = cpu::this_cpu() else {
        return Check::pass("cpu", "no /proc/cpuinfo; instruction sets unknown".into());
    };
    let isa = cpu::isa_flags(&flags);
    let families: Vec<&str> = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"), ("amx_tile", "AMX")]
        .iter()
        .filter(|(flag, _)| isa.contains(*flag))
        .map(|(_, label)| *label)
        .collect();
    let detail = format!("{name}: {}", if families.is_empty() { "no AVX2".to_string() } else { families.join(", ") });
    if isa.contains("avx2") {
        Check::pass("cpu", detail)
    } else {
        Check::fail("cpu", detail, "the quantized kernels expect AVX2; generation will be slow").optional()
    }
}

fn build_check() -> Check {
    let Some((_, flags)) = cpu::this_cpu() else { return Check::pass("binary", "built natively; CPU unknown".into()) };
    let lacking = cpu::missing(cpu::built_for(), &flags);
    if lacking.is_empty() {
        Check::pass("binary", format!("built for this CPU's instruction sets (magpie {})", env!("CARGO_PKG_VERSION")))
    } else {
        Check::fail(
            "binary",
            format!("built on a CPU with {} that this one lacks: it would die with SIGILL", lacking.join(", ")),
            "scripts/setup.sh (it builds into a target dir keyed by this CPU)",
        )
    }
}

fn ggml_check() -> Check {
    match crate::engine::llamacpp::system_info() {
        Err(e) => Check::fail("llama.cpp", format!("{e:#}"), "scripts/setup.sh"),
        Ok(info) if info.contains("AMX") => Check::fail(
            "llama.cpp",
            format!("AMX kernels are built in ({info}); they crash and break batch invariance"),
            "build with the CFLAGS/CXXFLAGS in .cargo/config.toml (scripts/setup.sh does)",
        ),
        Ok(info) => Check::pass("llama.cpp", info),
    }
}

/// The libtorch this process loaded, from its memory map.
fn loaded_libtorch() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.ends_with("/libtorch_cpu.so")).map(|p| Path::new(p).parent().unwrap().to_path_buf())
}

fn libtorch_check() -> Check {
    // Touch libtorch so that it is mapped, then read which file it came from.
    let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
    let Some(lib) = loaded_libtorch() else {
        return Check::fail("libtorch", "not found in this process".into(), "scripts/setup.sh");
    };
    let version = std::fs::read_to_string(lib.join("../version.py"))
        .ok()
        .and_then(|v| v.lines().find_map(|l| l.strip_prefix("__version__ = ").map(|s| s.trim_matches(['\'', '"']).to_string())))
        .unwrap_or_else(|| "version unknown".into());
    Check::pass("libtorch", format!("{version} at {}", lib.display()))
}

fn cuda_check() -> Check {
    let count = tch::Cuda::device_count();
    if count == 0 {
        return Check::fail("cuda", "no CUDA device visible to libtorch; training runs on CPU".into(), "for GPU training: a CUDA torch wheel and a visible GPU (the demo needs neither)")
            .optional();
    }
    let names = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().replace('\n', "; "))
        .unwrap_or_else(|| "names unknown (no nvidia-smi)".into());
    Check::pass("cuda", format!("{count} device(s): {names}"))
}

fn model_check(name: &'static str, path: &Path, what: &str) -> Check {
    if path.exists() {
        Check::pass(name, format!("{} ({})", path.display(), human_size(size_of(path))))
    } else {
        Check::fail(name, format!("{}: {what} is missing", path.display()), "scripts/setup.sh (or set MAGPIE_HOME to where it is)")
    }
}

fn cache_check(cache: &Path) -> Check {
    let detail = if cache.exists() { format!("{} ({})", cache.display(), human_size(size_of(cache))) } else { format!("{} (empty)", cache.display()) };
    Check::pass("cache", detail)
}

/// Bytes under `path` (a file, or a folder walked without following links).
fn size_of(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path).into_iter().flatten().flatten().map(|e| size_of(&e.path())).sum()
}

fn human_size(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_is_built_without_amx() {
        // On an AMX CPU (Sapphire Rapids and later) a native build compiles ggml's AMX backend
        // unless the -mno-amx-* flags of .cargo/config.toml take effect; elsewhere it passes trivially.
        let info = crate::engine::llamacpp::system_info().unwrap();
        assert!(info.contains("CPU"), "{info}");
        assert!(!info.contains("AMX"), "{info}");
    }

    #[test]
    fn missing_models_fail_with_a_fix_and_present_ones_pass() {
        let empty = tempfile::tempdir().unwrap();
        let checks = checks(empty.path(), empty.path());
        let model = checks.iter().find(|c| c.name == "model").unwrap();
        assert!(!model.ok && model.needed);
        assert!(model.fix.as_deref().unwrap().contains("scripts/setup.sh"));
        let checks = super::checks(&crate::test_support::magpie_home(), empty.path());
        for check in checks.iter().filter(|c| c.needed) {
            assert!(check.ok, "{check:?}");
        }
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_size(512), "512.0 B");
        assert_eq!(human_size(3 * 1024 * 1024 / 2), "1.5 MiB");
    }
}
