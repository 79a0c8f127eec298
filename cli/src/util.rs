//! Small helpers: sizes as qemu-img parses them, JSON output, option scanning, progress.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a size did not parse.
#[derive(Debug, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size at all.
    Invalid,
    /// Beyond 2^63 - 1.
    TooBig,
}

/// Parses a size as QEMU's qemu_strtosz does: decimal or 0x hex, an optional fraction (only
/// with a unit), and an optional suffix b, k, M, G, T, P, E (any case; powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let hex = s.starts_with("0x") || s.starts_with("0X");
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() && !hex => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return Err(SizeError::Invalid),
            };
            (&s[..i], Some(shift))
        }
        _ => (s, None),
    };
    let shift = unit.unwrap_or(0);
    let (int, frac) = if let Some(hex) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(SizeError::Invalid);
        }
        let v = u128::from_str_radix(hex, 16).map_err(|_| SizeError::TooBig)?;
        (v, None)
    } else {
        let (i, f) = match num.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (num, None),
        };
        if i.is_empty() || !i.chars().all(|c| c.is_ascii_digit()) {
            return Err(SizeError::Invalid);
        }
        if let Some(f) = f {
            if f.is_empty() || !f.chars().all(|c| c.is_ascii_digit()) || shift == 0 {
                return Err(SizeError::Invalid);
            }
        }
        let v: u128 = i.parse().map_err(|_| SizeError::TooBig)?;
        (v, f)
    };
    let mut v = int
        .checked_shl(shift)
        .filter(|v| v >> shift == int)
        .ok_or(SizeError::TooBig)?;
    if let Some(f) = frac {
        let f = &f[..f.len().min(18)];
        let n: u128 = f.parse().map_err(|_| SizeError::Invalid)?;
        v += (n << shift) / 10u128.pow(f.len() as u32);
    }
    if v > i64::MAX as u128 {
        return Err(SizeError::TooBig);
    }
    Ok(v as u64)
}

/// A size for people: "64 MiB".
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v} {}", UNITS[u])
    } else {
        format!("{v:.3} {}", UNITS[u])
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON value, written compactly or indented.
pub enum Json {
    Null,
    Bool(bool),
    Num(u64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    /// Pretty-printed with 4 spaces, as qemu-img prints JSON.
    pub fn pretty(&self) -> String {
        let mut s = String::new();
        self.write(&mut s, 0);
        s
    }

    fn write(&self, s: &mut String, indent: usize) {
        let pad = |n: usize| " ".repeat(n * 4);
        match self {
            Json::Null => s.push_str("null"),
            Json::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => {
                let _ = write!(s, "{n}");
            }
            Json::Str(t) => s.push_str(&json_str(t)),
            Json::Arr(v) if v.is_empty() => s.push_str("[]"),
            Json::Arr(v) => {
                // Arrays of small objects (extents) on one line each.
                s.push_str("[\n");
                for (i, x) in v.iter().enumerate() {
                    s.push_str(&pad(indent + 1));
                    x.write(s, indent + 1);
                    s.push_str(if i + 1 < v.len() { ",\n" } else { "\n" });
                }
                s.push_str(&pad(indent));
                s.push(']');
            }
            Json::Obj(v) if v.len() <= 2 && v.iter().all(|(_, x)| matches!(x, Json::Num(_))) => {
                s.push('{');
                for (i, (k, x)) in v.iter().enumerate() {
                    let _ = write!(s, "{}: ", json_str(k));
                    x.write(s, indent);
                    if i + 1 < v.len() {
                        s.push_str(", ");
                    }
                }
                s.push('}');
            }
            Json::Obj(v) if v.is_empty() => s.push_str("{}"),
            Json::Obj(v) => {
                s.push_str("{\n");
                for (i, (k, x)) in v.iter().enumerate() {
                    let _ = write!(s, "{}{}: ", pad(indent + 1), json_str(k));
                    x.write(s, indent + 1);
                    s.push_str(if i + 1 < v.len() { ",\n" } else { "\n" });
                }
                s.push_str(&pad(indent));
                s.push('}');
            }
        }
    }
}

/// How an option takes its value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    Flag,
    Value,
}

/// An option a subcommand accepts: long name (without --), short letter, arity.
pub struct OptSpec {
    pub long: &'static str,
    pub short: Option<char>,
    pub arity: Arity,
}

/// A parsed command line: options in order (by long name) and positional arguments.
pub struct Parsed {
    pub opts: Vec<(&'static str, String)>,
    pub args: Vec<std::ffi::OsString>,
}

/// getopt_long-like scanning: `--long`, `--long=value`, `--long value`, `-s`, `-svalue`,
/// `-s value`, grouped short flags, `--` ends options. Options and positionals may mix.
pub fn scan(argv: &[std::ffi::OsString], specs: &[OptSpec]) -> Result<Parsed, String> {
    let mut opts = Vec::new();
    let mut args = Vec::new();
    let mut i = 0;
    let mut only_args = false;
    while i < argv.len() {
        let raw = &argv[i];
        i += 1;
        let a = raw.to_string_lossy();
        if only_args || a == "-" || !a.starts_with('-') {
            args.push(raw.clone());
            continue;
        }
        if a == "--" {
            only_args = true;
            continue;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let Some(spec) = specs.iter().find(|s| s.long == name) else {
                return Err(format!("unrecognized option '--{name}'"));
            };
            match (spec.arity, inline) {
                (Arity::Flag, Some(_)) => {
                    return Err(format!("option '--{name}' doesn't allow an argument"))
                }
                (Arity::Flag, None) => opts.push((spec.long, String::new())),
                (Arity::Value, Some(v)) => opts.push((spec.long, v)),
                (Arity::Value, None) => {
                    let Some(v) = argv.get(i) else {
                        return Err(format!("option '--{name}' requires an argument"));
                    };
                    i += 1;
                    opts.push((spec.long, v.to_string_lossy().into_owned()));
                }
            }
            continue;
        }
        let chars: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            j += 1;
            let Some(spec) = specs.iter().find(|s| s.short == Some(c)) else {
                return Err(format!("invalid option -- '{c}'"));
            };
            if spec.arity == Arity::Flag {
                opts.push((spec.long, String::new()));
                continue;
            }
            let rest: String = chars[j..].iter().collect();
            if !rest.is_empty() {
                opts.push((spec.long, rest));
            } else if let Some(v) = argv.get(i) {
                i += 1;
                opts.push((spec.long, v.to_string_lossy().into_owned()));
            } else {
                return Err(format!("option requires an argument -- '{c}'"));
            }
            break;
        }
    }
    Ok(Parsed { opts, args })
}

/// Whether stderr is a terminal.
pub fn stderr_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(2) == 1 }
}

/// Elapsed-time progress on stderr while a long load or store runs, only on a terminal.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Starts showing `what` after half a second, if stderr is a terminal.
    pub fn start(what: String) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = stderr_is_tty().then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut shown = false;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    let el = t0.elapsed();
                    if el >= Duration::from_millis(500) {
                        let _ = write!(
                            std::io::stderr(),
                            "\rqdirty: {what}... {:.1}s",
                            el.as_secs_f64()
                        );
                        shown = true;
                    }
                }
                if shown {
                    let _ = write!(std::io::stderr(), "\r\x1b[K");
                }
            })
        });
        Progress { stop, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("1.0000001k"), Ok(1024));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1e"), Ok(1 << 60));
        assert_eq!(parse_size("65536b"), Ok(65536));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("8E"), Err(SizeError::TooBig));
        assert_eq!(parse_size("16E"), Err(SizeError::TooBig));
        for bad in [
            "", "1x", "1.5", "1.5b", "-1k", "1kB", "k", "1.k", "0x", " 1",
        ] {
            assert_eq!(parse_size(bad), Err(SizeError::Invalid), "{bad}");
        }
    }

    #[test]
    fn scanning() {
        let v = |s: &[&str]| s.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let specs = [
            OptSpec {
                long: "add",
                short: None,
                arity: Arity::Flag,
            },
            OptSpec {
                long: "granularity",
                short: Some('g'),
                arity: Arity::Value,
            },
            OptSpec {
                long: "merge",
                short: None,
                arity: Arity::Value,
            },
        ];
        let p = scan(
            &v(&["--add", "-g64k", "img", "--merge=x", "-g", "1M", "--", "-b"]),
            &specs,
        )
        .unwrap();
        assert_eq!(
            p.opts,
            vec![
                ("add", String::new()),
                ("granularity", "64k".into()),
                ("merge", "x".into()),
                ("granularity", "1M".into())
            ]
        );
        assert_eq!(p.args, v(&["img", "-b"]));
        assert!(scan(&v(&["--bogus"]), &specs).is_err());
        assert!(scan(&v(&["-g"]), &specs).is_err());
        assert!(scan(&v(&["--add=1"]), &specs).is_err());
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_str("a\"b\\\n\u{1}"), "\"a\\\"b\\\\\\n\\u0001\"");
        let j = Json::Obj(vec![
            (
                "a",
                Json::Arr(vec![Json::Obj(vec![
                    ("offset", Json::Num(0)),
                    ("length", Json::Num(5)),
                ])]),
            ),
            ("b", Json::Null),
        ]);
        assert_eq!(
            j.pretty(),
            "{\n    \"a\": [\n        {\"offset\": 0, \"length\": 5}\n    ],\n    \"b\": null\n}"
        );
    }
}
