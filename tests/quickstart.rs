//! Runs the README's first command (`examples/quickstart.rs`, built by `cargo test`) and checks
//! that it shows QEMU's semantics happening, with QEMU's own tools when they are installed.

mod common;

use std::process::Command;

#[test]
fn quickstart_runs_and_shows_the_semantics() {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let example = profile_dir.join("examples").join("quickstart");
    assert!(
        example.exists(),
        "cargo test builds the examples: {}",
        example.display()
    );
    let tmp = common::TempDir::new("quickstart");
    let out = Command::new(&example)
        .arg(tmp.path())
        .output()
        .expect("run quickstart");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "warning: Autoload option is deprecated and its value is ignored",
        "daily      granularity   65536  enabled  persistent",
        "frozen     granularity   65536  disabled persistent",
        "INCONSISTENT",
        "clear fails: Bitmap 'daily' is inconsistent and cannot be used",
        "hint: Try block-dirty-bitmap-remove to delete this bitmap from disk",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    if common::require_qemu("quickstart_runs_and_shows_the_semantics") {
        // QEMU's view, printed by the example: in-use while open, clean and auto at the end.
        assert!(text.contains("[0]: in-use"), "{text}");
        assert!(
            text.contains("No errors were found on the image."),
            "{text}"
        );
        let tail = &text[text.rfind("qemu-img info").unwrap()..];
        assert!(
            tail.contains("name: daily") && tail.contains("[0]: auto"),
            "{tail}"
        );
        assert!(!tail.contains("in-use"), "{tail}");
    }
}
