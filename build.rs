//! Link-time set-up for the binary: an rpath to the venv's libtorch, so `magpie` runs without
//! LD_LIBRARY_PATH, and libtorch_cuda linked even though no Rust symbol references it, so that a
//! CUDA wheel exposes the GPU to tch.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // torch-sys (`links = "tch"`) exports the libtorch directory it linked against.
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    if std::path::Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
