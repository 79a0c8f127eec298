//! The command's documentation and shell integration: `--version`, the manual page qdirty(1)
//! (names every subcommand and every option the --help texts list), the bash completion
//! (loads, completes subcommands, options and values), and scripts/install.sh installing the
//! command, the page and the completion.

use std::path::{Path, PathBuf};
use std::process::Command;

const QDIRTY: &str = env!("CARGO_BIN_EXE_qdirty");
const SUBCOMMANDS: [&str; 5] = ["info", "bitmap", "dump", "check", "create"];

fn cli_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn qd(args: &[&str]) -> String {
    let o = Command::new(QDIRTY).args(args).output().unwrap();
    assert!(o.status.success(), "qdirty {args:?}");
    String::from_utf8(o.stdout).unwrap()
}

/// The options a --help text lists (its lines that start with an option).
fn options_of(help: &str) -> Vec<String> {
    let mut v = Vec::new();
    for line in help.lines().map(str::trim_start) {
        if !line.starts_with('-') {
            continue;
        }
        for word in line.split([' ', ',', '=', '[']) {
            let w: String = word
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            let long = w.starts_with("--") && w.len() > 2;
            let short = w.len() == 2 && w.starts_with('-') && w.as_bytes()[1].is_ascii_alphabetic();
            if long || short {
                v.push(w);
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

#[test]
fn version_is_the_crates() {
    let v = qd(&["--version"]);
    assert_eq!(
        v,
        format!(
            "qdirty {} (libqdirty {})\n",
            env!("CARGO_PKG_VERSION"),
            env!("CARGO_PKG_VERSION")
        )
    );
}

#[test]
fn man_page_names_every_subcommand_and_option() {
    let page = std::fs::read_to_string(cli_dir().join("man/qdirty.1")).unwrap();
    assert!(page.starts_with(".\\\"") || page.starts_with(".TH"));
    assert!(page.contains(".TH QDIRTY 1"));
    let text = page
        .replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fR", "")
        .replace("\\fI", "");
    for sub in SUBCOMMANDS {
        assert!(
            text.contains(&format!(".SS \"{sub}\"")),
            "no section for {sub}"
        );
        let opts = options_of(&qd(&[sub, "--help"]));
        assert!(opts.len() >= 3, "{sub}: {opts:?}");
        for o in opts {
            assert!(text.contains(&o), "qdirty(1) does not mention {sub} {o}");
        }
    }
    for o in ["--help", "--version"] {
        assert!(text.contains(o), "{o}");
    }
    // man can render it, when man is installed.
    if Path::new("/usr/bin/man").exists() {
        let o = Command::new("man")
            .arg("-l")
            .arg(cli_dir().join("man/qdirty.1"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let shown = String::from_utf8_lossy(&o.stdout);
        assert!(
            shown.contains("SYNOPSIS") && shown.contains("qdirty info"),
            "{shown}"
        );
        assert!(
            o.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Sources the completion in bash and runs `script` after it; stdout.
fn bash(script: &str) -> String {
    let file = cli_dir().join("completion/qdirty.bash");
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!("source '{}' || exit 9\n{script}", file.display()))
        .current_dir(cli_dir())
        .output()
        .expect("bash");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// What the completion offers for the words (the last one being completed).
fn complete(words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let out = bash(&format!(
        "COMP_WORDS=({}); COMP_CWORD={}; _qdirty; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        quoted.join(" "),
        words.len() - 1
    ));
    out.lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn bash_completion_completes() {
    assert_eq!(bash("complete -p qdirty"), "complete -F _qdirty qdirty\n");
    assert_eq!(
        complete(&["qdirty", ""]),
        [
            "info",
            "bitmap",
            "dump",
            "check",
            "create",
            "--help",
            "--version"
        ]
    );
    assert_eq!(complete(&["qdirty", "bitmap", "--a"]), ["--add"]);
    assert_eq!(
        complete(&["qdirty", "bitmap", "--source-f"]),
        ["--source-file", "--source-format"]
    );
    assert_eq!(
        complete(&["qdirty", "info", "--output", ""]),
        ["human", "json"]
    );
    assert_eq!(
        complete(&["qdirty", "dump", "--output=j"]),
        ["--output=json"]
    );
    assert_eq!(complete(&["qdirty", "bitmap", "-f", "q"]), ["qcow2"]);
    assert_eq!(complete(&["qdirty", "check", "Cargo.to"]), ["Cargo.toml"]);
    // Every long option of every subcommand is offered.
    for sub in SUBCOMMANDS {
        let offered = complete(&["qdirty", sub, "--"]);
        for o in options_of(&qd(&[sub, "--help"])) {
            if o.starts_with("--") {
                assert!(
                    offered.contains(&o),
                    "{sub}: {o} not completed: {offered:?}"
                );
            }
        }
    }
}

#[test]
fn install_sh_installs_command_page_and_completion() {
    let root = cli_dir().join("..");
    let exe = PathBuf::from(QDIRTY);
    let lib = exe.parent().unwrap().join("libqdirty.so");
    if !lib.exists() || Command::new("readelf").arg("--version").output().is_err() {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIP install test: no cdylib or readelf");
        return;
    }
    let t = std::env::temp_dir().join(format!("qdirty-cli-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&t);
    let o = Command::new("bash")
        .arg(root.join("scripts/install.sh"))
        .arg("--prefix")
        .arg(t.join("usr"))
        .arg("--bindir")
        .arg(t.join("tools"))
        .arg("--mandir")
        .arg("man")
        .arg("--lib")
        .arg(&lib)
        .arg("--bin")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bin = t.join("tools/qdirty");
    let v = Command::new(&bin).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("qdirty "));
    assert_eq!(
        std::fs::read(t.join("usr/man/man1/qdirty.1")).unwrap(),
        std::fs::read(cli_dir().join("man/qdirty.1")).unwrap()
    );
    assert_eq!(
        std::fs::read(t.join("usr/share/bash-completion/completions/qdirty")).unwrap(),
        std::fs::read(cli_dir().join("completion/qdirty.bash")).unwrap()
    );
    let _ = std::fs::remove_dir_all(&t);
}
