//! Command-line scanning as glibc's `getopt_long` does it for qemu-img, with its messages.
//!
//! qemu-img parses each subcommand with `getopt_long`: options and operands may mix (operands
//! are collected in order), `--` ends the options, a long option may be abbreviated to any
//! unambiguous prefix (`--rem` is `--remove`), `--name=value` and `--name value`, `-gVALUE` and
//! `-g VALUE`, grouped short flags, and a value may start with `-` (`-g -1`, `-g --add`). The
//! options come back in command-line order, repeated ones included, so that a subcommand can
//! act on them in order as qemu-img does. An error is glibc's message, which the caller shows
//! as `qdirty SUBCOMMAND: MESSAGE` followed by qemu-img's "Try ... --help" line.

use std::ffi::OsString;

/// Whether an option takes a value.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Arity {
    Flag,
    Value,
}

/// An option a subcommand accepts. `long` is also the key the option is reported under.
#[derive(Debug)]
pub struct OptSpec {
    pub long: &'static str,
    pub short: Option<char>,
    pub arity: Arity,
}

/// Shorthand for an [`OptSpec`].
pub const fn opt(long: &'static str, short: Option<char>, arity: Arity) -> OptSpec {
    OptSpec { long, short, arity }
}

/// A scanned command line: the options in order (by long name, with their values) and the
/// operands.
#[derive(Debug)]
pub struct Parsed {
    pub opts: Vec<(&'static str, String)>,
    pub args: Vec<OsString>,
}

impl Parsed {
    /// Whether option `name` was given.
    pub fn has(&self, name: &str) -> bool {
        self.opts.iter().any(|(k, _)| *k == name)
    }

    /// The value of the last occurrence of option `name` (getopt's callers overwrite a
    /// variable on each occurrence).
    pub fn last(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The long option `typed` (what follows `--`, without `=value`) names: an exact match, else
/// the one option it is a prefix of. Several candidates: glibc's ambiguity message, listing
/// them in table order.
fn find_long<'a>(specs: &'a [OptSpec], typed: &str, whole: &str) -> Result<&'a OptSpec, String> {
    if let Some(s) = specs.iter().find(|s| s.long == typed) {
        return Ok(s);
    }
    let cands: Vec<&OptSpec> = specs
        .iter()
        .filter(|s| !typed.is_empty() && s.long.starts_with(typed))
        .collect();
    match cands.as_slice() {
        [] => Err(format!("unrecognized option '--{whole}'")),
        [one] => Ok(one),
        many => {
            let list: Vec<String> = many.iter().map(|s| format!(" '--{}'", s.long)).collect();
            Err(format!(
                "option '--{whole}' is ambiguous; possibilities:{}",
                list.concat()
            ))
        }
    }
}

/// Scans `argv` (the arguments after the subcommand) against `specs`: the options and
/// operands, and getopt's error if one stopped the scan (the options before it are returned, so
/// that the caller acts on them first, as qemu-img's getopt loop does).
pub fn scan(argv: &[OsString], specs: &[OptSpec]) -> (Parsed, Option<String>) {
    let mut opts = Vec::new();
    let mut args = Vec::new();
    let err = scan_into(argv, specs, &mut opts, &mut args).err();
    (Parsed { opts, args }, err)
}

fn scan_into(
    argv: &[OsString],
    specs: &[OptSpec],
    opts: &mut Vec<(&'static str, String)>,
    args: &mut Vec<OsString>,
) -> Result<(), String> {
    let mut i = 0;
    while i < argv.len() {
        let raw = &argv[i];
        i += 1;
        let a = raw.to_string_lossy();
        if a == "--" {
            args.extend(argv[i..].iter().cloned());
            break;
        }
        if a == "-" || !a.starts_with('-') {
            args.push(raw.clone());
            continue;
        }
        if let Some(whole) = a.strip_prefix("--") {
            let (typed, inline) = match whole.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (whole, None),
            };
            let spec = find_long(specs, typed, whole)?;
            match (spec.arity, inline) {
                (Arity::Flag, Some(_)) => {
                    return Err(format!(
                        "option '--{}' doesn't allow an argument",
                        spec.long
                    ))
                }
                (Arity::Flag, None) => opts.push((spec.long, String::new())),
                (Arity::Value, Some(v)) => opts.push((spec.long, v)),
                (Arity::Value, None) => {
                    let Some(v) = argv.get(i) else {
                        return Err(format!("option '--{}' requires an argument", spec.long));
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    fn ok(a: &[&str]) -> Parsed {
        let (p, e) = scan(&v(a), &SPECS);
        assert_eq!(e, None);
        p
    }

    const SPECS: [OptSpec; 5] = [
        opt("add", None, Arity::Flag),
        opt("granularity", Some('g'), Arity::Value),
        opt("merge", None, Arity::Value),
        opt("source-file", Some('b'), Arity::Value),
        opt("source-format", Some('F'), Arity::Value),
    ];

    #[test]
    fn order_values_and_operands() {
        let p = ok(&["--add", "-g64k", "img", "--merge=x", "-g", "-1", "--", "-b"]);
        assert_eq!(
            p.opts,
            vec![
                ("add", String::new()),
                ("granularity", "64k".into()),
                ("merge", "x".into()),
                ("granularity", "-1".into())
            ]
        );
        assert_eq!(p.args, v(&["img", "-b"]));
        assert_eq!(p.last("granularity"), Some("-1"));
        // A value may look like an option, as with getopt.
        let p = ok(&["-g", "--add", "-"]);
        assert_eq!(p.opts, vec![("granularity", "--add".into())]);
        assert_eq!(p.args, v(&["-"]));
    }

    #[test]
    fn abbreviations_and_glibc_messages() {
        let p = ok(&["--ad", "--mer", "x", "--source-fi=y"]);
        assert_eq!(
            p.opts,
            vec![
                ("add", String::new()),
                ("merge", "x".into()),
                ("source-file", "y".into())
            ]
        );
        let err = |a: &[&str]| scan(&v(a), &SPECS).1.unwrap();
        assert_eq!(err(&["--bogus=1"]), "unrecognized option '--bogus=1'");
        assert_eq!(err(&["-x"]), "invalid option -- 'x'");
        assert_eq!(err(&["-g"]), "option requires an argument -- 'g'");
        assert_eq!(err(&["--mer"]), "option '--merge' requires an argument");
        assert_eq!(err(&["--ad=1"]), "option '--add' doesn't allow an argument");
        assert_eq!(
            err(&["--source-f=x"]),
            "option '--source-f=x' is ambiguous; possibilities: '--source-file' \
             '--source-format'"
        );
        // The options before the error come back.
        let (p, e) = scan(&v(&["--add", "-g", "1k1", "--bogus", "-g", "2"]), &SPECS);
        assert_eq!(e.as_deref(), Some("unrecognized option '--bogus'"));
        assert_eq!(
            p.opts,
            vec![("add", String::new()), ("granularity", "1k1".into())]
        );
    }
}
