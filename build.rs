//! Build-time set-up for the binary:
//! - an rpath to the venv's libtorch, so `magpie` runs without LD_LIBRARY_PATH, and libtorch_cuda
//!   linked even though no Rust symbol references it, so that a CUDA wheel exposes the GPU to tch;
//! - `src/train/fused_adamw.cpp` (libtorch's fused AdamW), `src/model/flash_attention.cpp`
//!   (varlen flash attention), `src/train/determinism.cpp` (deterministic mode),
//!   `src/train/device_memory.cpp` (a GPU's memory),
//!   `src/model/seeded_random.cpp` (seeded random tensors) and `src/train/distributed/c10d.cpp`,
//!   the C++ side of the process groups (libtorch's c10d), against the same libtorch: Gloo always, NCCL when libtorch has CUDA and the CUDA and NCCL headers are
//!   installed (the `nvidia-*` wheels scripts/setup.sh installs);
//! - the instruction-set flags of the CPU it was built on (`MAGPIE_BUILD_CPU_FLAGS`): the build is
//!   native to that CPU, and the binary checks them at start (src/cpu.rs). A portable build sets
//!   `MAGPIE_BUILD_CPU_FLAGS` to its target's flags instead.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // scripts/env.sh keys the target dir by this id; a change means another CPU's build.
    println!("cargo:rerun-if-env-changed=MAGPIE_CPU_ID");
    // A portable build (scripts/build-device.sh: target-cpu=x86-64-v3) names its target's flags.
    println!("cargo:rerun-if-env-changed=MAGPIE_BUILD_CPU_FLAGS");
    let cpu_flags = std::env::var("MAGPIE_BUILD_CPU_FLAGS").ok().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| info.lines().find(|l| l.starts_with("flags")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
            .unwrap_or_default()
    });
    println!("cargo:rustc-env=MAGPIE_BUILD_CPU_FLAGS={cpu_flags}");

    // torch-sys (`links = "tch"`) exports the libtorch directory it linked against.
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    let cuda = Path::new(&lib_dir).join("libtorch_cuda.so").exists();
    if cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    compile_c10d(Path::new(&lib_dir), cuda);
}

/// Compiles the C++ that calls libtorch where tch has no wrapper: the c10d shim, the fused
/// AdamW kernel's, varlen flash attention's, deterministic mode's, a GPU's memory and the
/// seeded samplers. NCCL
/// needs `cuda_runtime.h` with the compiler's `crt/` headers and `nccl.h`; they are looked for in
/// the wheels beside torch and in `$CUDA_HOME`.
fn compile_c10d(lib_dir: &Path, cuda: bool) {
    const SHIM: &str = "src/train/distributed/c10d.cpp";
    const FUSED_ADAMW: &str = "src/train/fused_adamw.cpp";
    const FLASH_ATTENTION: &str = "src/model/flash_attention.cpp";
    const DETERMINISM: &str = "src/train/determinism.cpp";
    const DEVICE_MEMORY: &str = "src/train/device_memory.cpp";
    const SEEDED_RANDOM: &str = "src/model/seeded_random.cpp";
    const VENDOR: &str = "src/train/distributed/vendor";
    println!("cargo:rerun-if-changed={SHIM}");
    println!("cargo:rerun-if-changed={FUSED_ADAMW}");
    println!("cargo:rerun-if-changed={FLASH_ATTENTION}");
    println!("cargo:rerun-if-changed={DETERMINISM}");
    println!("cargo:rerun-if-changed={DEVICE_MEMORY}");
    println!("cargo:rerun-if-changed={SEEDED_RANDOM}");
    println!("cargo:rerun-if-changed=src/torch_ffi.h");
    println!("cargo:rerun-if-changed={VENDOR}");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let torch = lib_dir.parent().expect("libtorch's lib folder has a parent");
    let include = torch.join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .file(SHIM)
        .file(FUSED_ADAMW)
        .file(FLASH_ATTENTION)
        .file(DETERMINISM)
        .file(DEVICE_MEMORY)
        .file(SEEDED_RANDOM)
        .include(VENDOR)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag("-Wno-interference-size")
        .warnings(false);
    let site = torch.parent().expect("torch sits in site-packages");
    let mut candidates: Vec<PathBuf> = ["nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/cuda_nvcc/include", "nvidia/cuda_cccl/include", "nvidia/nccl/include"]
        .iter()
        .map(|d| site.join(d))
        .collect();
    if let Ok(home) = std::env::var("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("include"));
    }
    for dir in candidates.iter().filter(|d| d.is_dir()) {
        println!("cargo:rerun-if-changed={}", dir.display()); // headers installed later
    }
    let find = |header: &str| candidates.iter().find(|d| d.join(header).exists()).cloned();
    let headers = [find("cuda_runtime.h"), find("crt/host_config.h"), find("nv/target"), find("nccl.h")];
    if cuda && headers.iter().all(Option::is_some) {
        for dir in headers.into_iter().flatten() {
            build.include(dir);
        }
        build.define("USE_C10D_NCCL", None).define("MAGPIE_NCCL", None);
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    } else if cuda {
        println!("cargo:warning=magpie: NCCL process groups left out: no CUDA headers beside torch (scripts/setup.sh installs nvidia-cuda-crt and nvidia-cuda-cccl); Gloo only");
    }
    build.compile("magpie_torch");
}
