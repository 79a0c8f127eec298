//! Small helpers: sizes as qemu-img parses them, JSON output as qemu-img prints it, progress.

use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Parses a size as QEMU's `qemu_strtosz` (through qemu-img's `cvtnum`) does: leading
/// whitespace, an optional sign, decimal or `0x` hex, an optional fraction (decimal only; a
/// non-zero one needs a unit: `1.0` is 1, `0.5` is refused), and an optional suffix b, k, M, G,
/// T, P, E (any case; powers of 1024), rounding half a byte up. A negative number or one beyond
/// 2^63 - 1 is out of range ([`SizeError::TooBig`]), unless more text follows it, which makes it
/// invalid (as QEMU reports `-1` and `-1k`).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        let n = hex.bytes().take_while(u8::is_ascii_hexdigit).count();
        if n == 0 || n != hex.len() || neg {
            return Err(SizeError::Invalid);
        }
        let v = u64::from_str_radix(hex, 16).map_err(|_| SizeError::TooBig)?;
        return in_range(u128::from(v));
    }
    let n = t.bytes().take_while(u8::is_ascii_digit).count();
    let (int, rest) = t.split_at(n);
    if neg || int.parse::<u64>().is_err() && n > 0 {
        // QEMU's integer parse fails with ERANGE; text after the number makes it EINVAL.
        return Err(if n > 0 && rest.is_empty() {
            SizeError::TooBig
        } else {
            SizeError::Invalid
        });
    }
    let (frac, rest) = match rest.strip_prefix('.') {
        Some(r) => {
            let m = r.bytes().take_while(u8::is_ascii_digit).count();
            (Some(&r[..m]), &r[m..])
        }
        None => (None, rest),
    };
    if n == 0 && frac.is_none_or(str::is_empty) {
        return Err(SizeError::Invalid);
    }
    let (shift, rest) = match rest.chars().next().map(|c| c.to_ascii_lowercase()) {
        Some(c @ ('b' | 'k' | 'm' | 'g' | 't' | 'p' | 'e')) => {
            let shift = match c {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                _ => 60,
            };
            (shift, &rest[1..])
        }
        _ => (0, rest),
    };
    if !rest.is_empty() {
        return Err(SizeError::Invalid);
    }
    let int: u128 = if n == 0 {
        0
    } else {
        u128::from(int.parse::<u64>().unwrap_or(0))
    };
    // The fraction as QEMU keeps it: a 0.64 fixed-point number from a double.
    let valf: u128 = match frac {
        Some(f) if !f.is_empty() => {
            let x: f64 = format!("0.{f}").parse().map_err(|_| SizeError::Invalid)?;
            (x * 18_446_744_073_709_551_616.0) as u64 as u128
        }
        _ => 0,
    };
    if shift == 0 && valf != 0 {
        return Err(SizeError::Invalid);
    }
    let prod = valf << shift;
    let v = (int << shift) + (prod >> 64) + ((prod >> 63) & 1);
    in_range(v)
}

/// `cvtnum`'s range: 0 ..= 2^63 - 1.
fn in_range(v: u128) -> Result<u64, SizeError> {
    if v > i64::MAX as u128 {
        Err(SizeError::TooBig)
    } else {
        Ok(v as u64)
    }
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

/// Prints a JSON document as qemu-img does: indented by 4 spaces, then a newline.
pub fn print_json(v: &serde_json::Value) {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser).expect("a JSON value serializes");
    out.push(b'\n');
    crate::out::write_out_bytes(&out);
}

/// Whether stderr is a terminal.
pub fn stderr_is_tty() -> bool {
    std::io::stderr().is_terminal()
}

/// Progress on stderr while a long load or store runs, only on a terminal, after half a second:
/// the elapsed time, and the percentage done when the total is known ([`Progress::counted`]).
pub struct Progress {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Shows `what` with the elapsed time.
    pub fn start(what: String) -> Progress {
        Self::with_total(what, None)
    }

    /// Shows `what` with the share of `total` steps done (see [`Progress::step`]).
    pub fn counted(what: String, total: u64) -> Progress {
        Self::with_total(what, Some(total))
    }

    /// One more step done.
    pub fn step(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    fn with_total(what: String, total: Option<u64>) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let thread = stderr_is_tty().then(|| {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut shown = false;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    let el = t0.elapsed();
                    if el >= Duration::from_millis(500) {
                        let pct = total
                            .filter(|&t| t > 0)
                            .map(|t| {
                                let d = done.load(Ordering::Relaxed).min(t);
                                format!(" {}% ({d}/{t})", d * 100 / t)
                            })
                            .unwrap_or_default();
                        let _ = write!(
                            std::io::stderr(),
                            "\r\x1b[Kqdirty: {what}...{pct} {:.1}s",
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
        Progress { stop, done, thread }
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

    /// Expected values: qemu-img 10.0.2's `bitmap --add -g VALUE` on each (the granularity it
    /// stored, or which of cvtnum's two messages it printed).
    #[test]
    fn sizes_like_qemu() {
        for (s, v) in [
            ("100", 100),
            ("64k", 65536),
            ("64K", 65536),
            ("1M", 1 << 20),
            ("1.5k", 1536),
            ("1.0000001k", 1024),
            ("2T", 2 << 40),
            ("1e", 1 << 60),
            ("65536b", 65536),
            ("0x1000", 4096),
            ("0X200", 512),
            (" 0x200", 512),
            ("+512", 512),
            (" 512", 512),
            ("\t512", 512),
            ("512B", 512),
            ("0.5k", 512),
            (".5k", 512),
            ("1.k", 1024),
            ("5.b", 5),
            ("5.0b", 5),
            ("1.0", 1),
            ("0.0", 0),
            ("0.0001k", 0),
            ("00512", 512),
            ("0x0", 0),
            ("6G", 6 << 30),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s:?}");
        }
        for s in [
            "8E",
            "16E",
            "-1",
            "-0",
            " -1",
            "-512",
            "99999999999999999999",
            "9223372036854775808",
            "0x8000000000000000",
            "8192P",
        ] {
            assert_eq!(parse_size(s), Err(SizeError::TooBig), "{s:?}");
        }
        for s in [
            "",
            " ",
            "k",
            "+",
            "-",
            "1 ",
            "1x",
            "1.5",
            "0.5",
            "1.5b",
            "0.5b",
            "-1k",
            "-1.5k",
            "1kB",
            "0x",
            "0x10k",
            "0x1k",
            "0x1.5",
            "0b1",
            "0x-1",
            "-0x1",
            "+-1",
            "++1",
            "1..5k",
            "1.5.k",
            "1.5kk",
            "1e3",
            "1.5e3",
            "1.5 k",
            ".k",
            ".",
            "99999999999999999999k",
        ] {
            assert_eq!(parse_size(s), Err(SizeError::Invalid), "{s:?}");
        }
    }
}
