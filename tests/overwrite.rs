//! Through the real binary: `--overwrite` never reaches outside its folder. It refuses, with
//! nothing removed, an output that holds a link, a manifest naming paths outside the folder, an
//! output path that is itself a link, and a user's file anywhere inside.

use std::path::{Path, PathBuf};

mod common;
use common::{converted_smollm2, fixture, magpie, refused, s, snapshot, stderr};

/// A copy of `from` at `to` (files and folders only).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() { copy_dir(&entry.path(), &target) } else { std::fs::copy(entry.path(), &target).map(|_| ()).unwrap() }
    }
}

/// Appends `path` to the `files` of `dir`'s manifest, as an edited or forged manifest would.
fn add_to_manifest(dir: &Path, path: &str) {
    let file = dir.join(".magpie-manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    manifest["files"].as_array_mut().unwrap().push(serde_json::json!({"path": path, "bytes": 9, "xxh3": "0"}));
    std::fs::write(&file, manifest.to_string()).unwrap();
}

#[test]
fn sft_overwrite_refuses_links_inside_an_output_that_is_a_link_and_user_files_deep_inside() {
    let dir = tempfile::tempdir().unwrap();
    let model = converted_smollm2(dir.path());
    let t0 = dir.path().join("t0");
    let sft = |out: &Path, steps: &str| -> Vec<String> {
        ["sft", "--model", s(&model), "-i", s(&fixture("magpie-released.parquet")), "-o", s(out), "--max-length", "48",
            "--per-device-train-batch-size", "1", "--max-steps", steps, "--save-steps", "1", "--device", "cpu"]
            .iter()
            .map(|a| a.to_string())
            .collect()
    };
    let args = sft(&t0, "2");
    let output = magpie(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
    let overwrite = |out: &Path| -> Vec<String> { sft(out, "1").into_iter().chain(["--overwrite".to_string()]).collect() };
    let strs = |v: &[String]| v.iter().map(|a| a.to_string()).collect::<Vec<String>>();

    // 1. `model` inside the output is a link to someone's model: refused, the link not followed.
    let t5 = dir.path().join("t5");
    copy_dir(&t0, &t5);
    let victim = dir.path().join("victim");
    copy_dir(&t0.join("model"), &victim);
    std::fs::remove_dir_all(t5.join("model")).unwrap();
    std::os::unix::fs::symlink(&victim, t5.join("model")).unwrap();
    let before = snapshot(&victim);
    let args = strs(&overwrite(&t5));
    refused(dir.path(), &args.iter().map(String::as_str).collect::<Vec<_>>(), "is a symbolic link");
    assert_eq!(snapshot(&victim), before);

    // 2. The output path itself is a link to a finished output, given with or without a
    // trailing slash (with one, the system follows the link even where magpie asks it not to).
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&t0, &link).unwrap();
    let before = snapshot(&t0);
    for output in [link.clone(), PathBuf::from(format!("{}/", link.display()))] {
        let args = strs(&overwrite(&output));
        refused(dir.path(), &args.iter().map(String::as_str).collect::<Vec<_>>(), "is a symbolic link");
        assert_eq!(snapshot(&t0), before);
    }

    // 3. A user's file deep inside: refused before anything is removed, so the run stays whole
    // and a later rerun still works once the file is moved away.
    std::fs::write(t0.join("model/notes.txt"), b"mine").unwrap();
    let args = strs(&overwrite(&t0));
    refused(dir.path(), &args.iter().map(String::as_str).collect::<Vec<_>>(), "model/notes.txt");
    std::fs::remove_file(t0.join("model/notes.txt")).unwrap();
    let output = magpie(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn filter_and_synth_overwrite_refuse_a_manifest_naming_paths_outside_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, b"precious!").unwrap();
    let filter = dir.path().join("out/filtered");
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    let released = fixture("magpie-released.parquet");
    let filter_args = ["filter", "-i", s(&released), "-o", s(&filter), "--steps", r#"[{"step": "exact_dedup"}]"#];
    assert!(magpie(&filter_args).status.success());
    let synth = dir.path().join("out/synth");
    let synth_args = ["synth", "--num", "2", "--max-tokens", "8", "--response-max-tokens", "8", "--threads", "2", "-o", s(&synth)];
    let output = magpie(&synth_args);
    assert!(output.status.success(), "{}", stderr(&output));
    for named in [victim.display().to_string(), "../../victim.txt".to_string()] {
        for (out, args) in [(&filter, &filter_args[..]), (&synth, &synth_args[..])] {
            let original = std::fs::read(out.join(".magpie-manifest.json")).unwrap();
            add_to_manifest(out, &named);
            refused(dir.path(), &[args, &["--overwrite"]].concat(), &format!("lists `{named}`, which is not a relative path inside"));
            assert_eq!(std::fs::read(&victim).unwrap(), b"precious!");
            std::fs::write(out.join(".magpie-manifest.json"), original).unwrap();
        }
    }
    // With the manifest restored, --overwrite replaces both as before.
    for args in [&filter_args[..], &synth_args[..]] {
        let output = magpie(&[args, &["--overwrite"]].concat());
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
    }
}

#[test]
fn inspect_verify_catches_a_changed_part_that_sizes_alone_miss() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("filtered");
    assert!(magpie(&["filter", "-i", s(&fixture("magpie-released.parquet")), "-o", s(&out), "--steps", r#"[{"step": "exact_dedup"}]"#]).status.success());
    let output = magpie(&["inspect", "--verify", s(&out)]);
    assert!(output.status.success() && String::from_utf8_lossy(&output.stdout).contains("verified: "), "{}", stderr(&output));
    // One byte of the part's data changed in place: same size and footer, other content.
    let part = out.join("part-00000.parquet");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[8] ^= 0x01;
    std::fs::write(&part, bytes).unwrap();
    let output = magpie(&["inspect", "--verify", s(&out)]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("xxh3 hash"), "{}", stderr(&output));
}
