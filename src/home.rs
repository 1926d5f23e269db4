//! Where magpie keeps things outside a run's own output: `$MAGPIE_HOME` (the models set-up
//! installs, with the default model paths) and `$MAGPIE_CACHE` (content-keyed caches, such as
//! DPO reference log-probs; never the user's data folders).

use std::path::PathBuf;

/// File name of the embedded default generation model inside `$MAGPIE_HOME`.
pub const DEFAULT_MODEL_FILE: &str = "smollm2-135m-instruct-q4_1.gguf";

/// Folder name of the default sentence encoder (semantic dedup) inside `$MAGPIE_HOME`.
pub const DEFAULT_EMBEDDING_MODEL_DIR: &str = "all-minilm-l6-v2";

/// Where set-up puts models: `$MAGPIE_HOME`, else `./models`.
pub fn magpie_home() -> PathBuf {
    std::env::var_os("MAGPIE_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("models"))
}

/// The embedded default generation model (SmolLM2-135M-Instruct, Q4_1 GGUF).
pub fn default_model() -> PathBuf {
    magpie_home().join(DEFAULT_MODEL_FILE)
}

/// The default sentence encoder (all-MiniLM-L6-v2).
pub fn default_embedding_model() -> PathBuf {
    magpie_home().join(DEFAULT_EMBEDDING_MODEL_DIR)
}

/// `$MAGPIE_CACHE`, else `$XDG_CACHE_HOME/magpie`, else `~/.cache/magpie`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MAGPIE_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("magpie");
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/magpie")).unwrap_or_else(|| PathBuf::from(".magpie-cache"))
}
