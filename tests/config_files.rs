//! The shipped configuration files stay valid, and the reference documents what they use:
//! every `conf/*.yaml` passes `breakwater check`, and every top-level and service-level field
//! of `conf/example.yaml` is named in `docs/configuration.md`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn conf_files() -> Vec<PathBuf> {
    let dir = manifest_dir().join("conf");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_config_passes_check() {
    let files = conf_files();
    assert!(
        files.iter().any(|p| p.ends_with("example.yaml")),
        "conf/example.yaml is missing: {files:?}"
    );
    for file in files {
        let output = Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .arg("check")
            .arg("-c")
            .arg(&file)
            .current_dir(manifest_dir())
            .output()
            .expect("run breakwater check");
        assert!(
            output.status.success(),
            "breakwater check -c {} exited with {}\nstdout: {}\nstderr: {}",
            file.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
}

fn keys(value: &serde_yaml::Value) -> Vec<String> {
    value
        .as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn example_fields_are_documented() {
    let example_path = manifest_dir().join("conf/example.yaml");
    let doc_path = manifest_dir().join("docs/configuration.md");
    let example = std::fs::read_to_string(&example_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", example_path.display()));
    let doc = std::fs::read_to_string(&doc_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", doc_path.display()));
    let example: serde_yaml::Value =
        serde_yaml::from_str(&example).expect("conf/example.yaml is YAML");

    let mut fields = keys(&example);
    let services = example
        .get("services")
        .and_then(serde_yaml::Value::as_mapping)
        .expect("conf/example.yaml has services");
    assert!(!services.is_empty(), "conf/example.yaml has no service");
    for service in services.values() {
        fields.extend(keys(service));
    }
    fields.sort();
    fields.dedup();

    let missing: Vec<&String> = fields
        .iter()
        .filter(|field| !doc.contains(&format!("`{field}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "fields used in conf/example.yaml but not documented in docs/configuration.md: {missing:?}"
    );
}
