//! What every benchmark of the workspace starts with: its section filter and its banner.

use std::process::Command;

/// The section names given on the command line (`cargo bench --bench NAME -- a b`), without
/// the flags cargo adds (`--bench`).
pub fn sections() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect()
}

/// Whether section `name` runs: every section runs when none is named.
pub fn wants(sections: &[String], name: &str) -> bool {
    sections.is_empty() || sections.iter().any(|a| a == name)
}

/// The load average, as /proc/loadavg gives it (empty where there is none).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// "# NAME benchmark (commit C, load average: L)": the first line of every benchmark's output,
/// so that a figure copied from it carries its commit and how busy the machine was.
pub fn banner(name: &str) -> String {
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "# {name} benchmark (commit {commit}, load average: {})",
        load_average()
    )
}
