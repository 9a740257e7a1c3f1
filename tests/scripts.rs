//! The shell scripts people run by hand (scripts/, loadtest/): they parse, they are executable,
//! and the ones with options document every option they accept. None of them is run for real
//! here (they build, install packages or load the machine for minutes); a script that no
//! longer parses, or an option its `--help` does not mention, fails here instead of in front
//! of someone following the README.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files under `dir` (not recursive) that start with a bash shebang.
fn bash_scripts(dir: &str) -> Vec<PathBuf> {
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            std::fs::read_to_string(path)
                .map(|text| {
                    text.starts_with("#!/usr/bin/env bash") || text.starts_with("#!/bin/bash")
                })
                .unwrap_or(false)
        })
        .collect();
    scripts.sort();
    scripts
}

#[test]
fn every_script_parses_and_is_executable() {
    let mut scripts = bash_scripts("scripts");
    scripts.extend(bash_scripts("loadtest"));
    scripts.extend(bash_scripts(".ci"));
    for name in ["scripts/build-pgo", "scripts/test", "loadtest/bench.sh"] {
        assert!(
            scripts.contains(&repo().join(name)),
            "{name} is not found as a bash script"
        );
    }
    for script in &scripts {
        let status = Command::new("bash").arg("-n").arg(script).status().unwrap();
        assert!(status.success(), "{} does not parse", script.display());
        // lib.sh is sourced, not run.
        if script.file_name().is_some_and(|n| n != "lib.sh") {
            let mode = std::fs::metadata(script).unwrap().permissions().mode();
            assert!(mode & 0o111 != 0, "{} is not executable", script.display());
        }
    }
}

/// The `--long-options` a script's argument loop matches (`--name)` or `--a|--b)` patterns).
fn parsed_options(text: &str) -> BTreeSet<String> {
    let mut options = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim_start();
        let Some(pattern) = line.split_once(')').map(|(p, _)| p) else {
            continue;
        };
        if !pattern.starts_with("--") && !pattern.starts_with("-h|") {
            continue;
        }
        for alternative in pattern.split('|') {
            if alternative.starts_with("--") && !alternative.contains(' ') {
                options.insert(alternative.to_string());
            }
        }
    }
    options
}

fn help_text(script: &Path) -> String {
    let out = Command::new(script).arg("--help").output().unwrap();
    assert!(out.status.success(), "{} --help failed", script.display());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn scripts_with_options_document_each_one_in_their_help() {
    let mut scripts = bash_scripts("scripts");
    scripts.extend(bash_scripts("loadtest"));
    let with_help: Vec<PathBuf> = scripts
        .into_iter()
        .filter(|s| parsed_options(&std::fs::read_to_string(s).unwrap()).contains("--help"))
        .collect();
    for name in [
        "scripts/build-pgo",
        "loadtest/bench.sh",
        "loadtest/instructions.sh",
    ] {
        assert!(
            with_help.contains(&repo().join(name)),
            "{name} is not found with a --help"
        );
    }
    for script in &with_help {
        let name = script.strip_prefix(repo()).unwrap().display();
        let options = parsed_options(&std::fs::read_to_string(script).unwrap());
        let help = help_text(script);
        // The help is the comment block under the shebang, all of it.
        let text = std::fs::read_to_string(script).unwrap();
        for line in text.lines().skip(1).take_while(|l| l.starts_with('#')) {
            let line = line.trim_start_matches('#').trim();
            assert!(help.contains(line), "{name} --help leaves out {line:?}");
        }
        for option in options.iter().filter(|o| *o != "--help") {
            assert!(
                help.contains(option.as_str()),
                "{name} --help does not mention {option}"
            );
        }
    }
}

#[test]
fn option_patterns_are_found_in_a_case_statement() {
    let text = "  case $1 in\n    --profile) P=$2 ;;\n    --a|--b) ;;\n    -h|--help) exit ;;\n    *) die ;;\n";
    let found: Vec<String> = parsed_options(text).into_iter().collect();
    assert_eq!(found, ["--a", "--b", "--help", "--profile"]);
}
