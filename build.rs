//! Build-time set-up for the binary:
//! - an rpath to the venv's libtorch, so `magpie` runs without LD_LIBRARY_PATH, and libtorch_cuda
//!   linked even though no Rust symbol references it, so that a CUDA wheel exposes the GPU to tch;
//! - the instruction-set flags of the CPU it was built on (`MAGPIE_BUILD_CPU_FLAGS`): the build is
//!   native to that CPU, and the binary checks them at start (src/cpu.rs).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // scripts/env.sh keys the target dir by this id; a change means another CPU's build.
    println!("cargo:rerun-if-env-changed=MAGPIE_CPU_ID");
    let cpu_flags = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| info.lines().find(|l| l.starts_with("flags")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    println!("cargo:rustc-env=MAGPIE_BUILD_CPU_FLAGS={cpu_flags}");

    // torch-sys (`links = "tch"`) exports the libtorch directory it linked against.
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    if std::path::Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
