//! Image specifications as qemu-img takes them: a file name, a `json:{...}` pseudo-filename, or
//! with `--image-opts` a QEMU option string (`driver=qcow2,file.filename=disk.qcow2`).
//!
//! The drivers that make sense here are accepted: qcow2 (or raw, which has no bitmaps) over the
//! `file` protocol (or `host_device` / `host_cdrom` on a device), with the options qemu-img
//! accepts for them; those that change what qdirty does are honoured (`read-only`,
//! `force-share`, `file.locking`), the others (caches, discard, AIO...) only checked as QEMU
//! checks them. Every refusal is qemu-img's message for the same situation. Other QEMU
//! drivers (vmdk, nbd, ...) are refused: qdirty cannot read them.

use serde::de::{Deserializer as _, MapAccess, SeqAccess, Visitor};

/// The format layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// No driver given: probed from the file's first bytes (qcow2 magic, else raw).
    Probe,
    Qcow2,
    /// raw, or the file itself with no format driver: no bitmaps can be stored there.
    Raw,
}

/// An image to open, resolved from what the user typed.
#[derive(Debug)]
pub struct ImageSpec {
    /// As typed: qemu-img's open errors name it (`Could not open 'ARG': ...`).
    pub arg: String,
    /// The file.
    pub filename: String,
    pub format: Format,
    /// QEMU's image locks (`file.locking=off` turns them off).
    pub locking: bool,
    /// Shared open without locks (`-U`, `force-share=on`).
    pub force_share: bool,
    /// Warnings qemu-img prints while parsing (deprecated short-form booleans).
    pub warnings: Vec<String>,
}

/// How the command opens the image.
pub struct Request<'a> {
    /// `--image-opts` was given.
    pub image_opts: bool,
    /// `-f FMT` / `-F FMT`.
    pub format: Option<&'a str>,
    /// Opened for writing.
    pub write: bool,
    /// `-U`.
    pub force_share: bool,
}

/// An option value, from an option string (always text) or from JSON.
#[derive(Clone, Debug, PartialEq)]
enum Val {
    Str(String),
    Bool(bool),
    Int(i128),
    Float(f64),
    Null,
}

impl Val {
    fn shown(&self) -> String {
        match self {
            Val::Str(s) => s.clone(),
            Val::Bool(b) => b.to_string(),
            Val::Int(i) => i.to_string(),
            Val::Float(f) => f.to_string(),
            Val::Null => "null".into(),
        }
    }
}

/// Options every block node takes (QEMU's bdrv_runtime_opts and the generic ones).
const COMMON_KEYS: &[&str] = &[
    "node-name",
    "driver",
    "read-only",
    "auto-read-only",
    "force-share",
    "discard",
    "detect-zeroes",
    "cache.direct",
    "cache.no-flush",
];

/// Options of QEMU's qcow2 driver (qcow2_runtime_opts, encryption, children).
const QCOW2_KEYS: &[&str] = &[
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "overlap-check",
    "overlap-check.template",
    "overlap-check.main-header",
    "overlap-check.active-l1",
    "overlap-check.active-l2",
    "overlap-check.refcount-table",
    "overlap-check.refcount-block",
    "overlap-check.snapshot-table",
    "overlap-check.inactive-l1",
    "overlap-check.inactive-l2",
    "overlap-check.bitmap-directory",
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
    "encrypt.format",
    "encrypt.key-secret",
];

/// Options of QEMU's raw driver.
const RAW_KEYS: &[&str] = &["offset", "size"];

/// Options of QEMU's file protocol driver (file-posix).
const FILE_KEYS: &[&str] = &[
    "filename",
    "aio",
    "aio-max-batch",
    "locking",
    "pr-manager",
    "x-check-cache-dropped",
    "drop-cache",
];

const BOOL_KEYS: &[&str] = &[
    "read-only",
    "auto-read-only",
    "force-share",
    "cache.direct",
    "cache.no-flush",
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "overlap-check.main-header",
    "overlap-check.active-l1",
    "overlap-check.active-l2",
    "overlap-check.refcount-table",
    "overlap-check.refcount-block",
    "overlap-check.snapshot-table",
    "overlap-check.inactive-l1",
    "overlap-check.inactive-l2",
    "overlap-check.bitmap-directory",
    "x-check-cache-dropped",
    "drop-cache",
];

const SIZE_KEYS: &[&str] = &[
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "offset",
    "size",
];

const NUMBER_KEYS: &[&str] = &["cache-clean-interval", "aio-max-batch"];

/// Format drivers of QEMU 10 that qdirty cannot read (refused), and its protocol drivers other
/// than file/host_device/host_cdrom (refused too).
const QEMU_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "luks",
    "parallels",
    "preallocate",
    "qcow",
    "qed",
    "quorum",
    "replication",
    "snapshot-access",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];
const QEMU_PROTOCOLS: &[&str] = &[
    "ftp", "ftps", "gluster", "http", "https", "iscsi", "iser", "nbd", "nfs", "null-aio",
    "null-co", "nvme", "rbd", "ssh",
];

const SIZE_HELP: &str = "\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, \
                         peta-\nand exabytes, respectively.";

/// A JSON object with its keys in order and duplicates kept (QEMU refuses them).
struct Obj(Vec<(String, Node)>);

enum Node {
    Val(Val),
    Obj(Obj),
    Arr(Vec<Node>),
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Val(Val::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Val(Val::Int(v.into())))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Val(Val::Int(v.into())))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Val(Val::Float(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Val(Val::Str(v.into())))
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Val(Val::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
        let mut v = Vec::new();
        while let Some(n) = a.next_element_seed(NodeSeed)? {
            v.push(n);
        }
        Ok(Node::Arr(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
        let mut v: Vec<(String, Node)> = Vec::new();
        while let Some(k) = a.next_key::<String>()? {
            if v.iter().any(|(x, _)| *x == k) {
                return Err(serde::de::Error::custom("duplicate key"));
            }
            v.push((k, a.next_value_seed(NodeSeed)?));
        }
        Ok(Node::Obj(Obj(v)))
    }
}

struct NodeSeed;

impl<'de> serde::de::DeserializeSeed<'de> for NodeSeed {
    type Value = Node;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

/// Parses `json:{...}` text as QEMU does, with its messages.
fn parse_json(text: &str) -> Result<Vec<(String, Val)>, String> {
    if text.trim().is_empty() {
        return Err("Could not parse the JSON options: Expecting a JSON value".into());
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let node = de.deserialize_any(NodeVisitor).and_then(|n| {
        de.end()?;
        Ok(n)
    });
    let node = node.map_err(|e| {
        let why = if e.is_eof() {
            "premature EOI".to_string()
        } else {
            let s = e.to_string();
            s.split(" at line ").next().unwrap_or(&s).to_string()
        };
        format!("Could not parse the JSON options: JSON parse error, {why}")
    })?;
    let Node::Obj(obj) = node else {
        return Err("Invalid JSON object given".into());
    };
    let mut out = Vec::new();
    flatten("", Node::Obj(obj), &mut out);
    Ok(out)
}

fn flatten(prefix: &str, node: Node, out: &mut Vec<(String, Val)>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match node {
        Node::Val(v) => out.push((prefix.to_string(), v)),
        Node::Obj(Obj(kv)) => {
            for (k, n) in kv {
                flatten(&key(&k), n, out);
            }
        }
        Node::Arr(items) => {
            for (i, n) in items.into_iter().enumerate() {
                flatten(&key(&i.to_string()), n, out);
            }
        }
    }
}

/// Parses a QEMU option string (`key=value,...`; `,,` is a comma; the first bare word is the
/// implied `file`, later ones deprecated short-form booleans).
fn parse_opts(s: &str, warnings: &mut Vec<String>) -> Vec<(String, Val)> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        if item.is_empty() && i > 0 {
            continue;
        }
        match item.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), Val::Str(v.to_string()))),
            None if i == 0 => out.push(("file".to_string(), Val::Str(item))),
            None => {
                warnings.push(format!(
                    "warning: short-form boolean option '{item}' deprecated\nPlease use \
                     {item}=on instead"
                ));
                out.push((item, Val::Str("on".into())));
            }
        }
    }
    out
}

/// QEMU's boolean option values.
fn as_bool(v: &Val) -> Option<bool> {
    match v {
        Val::Bool(b) => Some(*b),
        Val::Str(s) => match s.as_str() {
            "on" | "yes" | "true" | "y" => Some(true),
            "off" | "no" | "false" | "n" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// QEMU's node-name rule (id_wellformed): a letter, then letters, digits, `-`, `.`, `_`.
fn valid_id(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '-' | '.' | '_'))
}

/// Checks the value of option `name` (within its node) as QEMU does.
fn check_value(name: &str, v: &Val) -> Result<(), String> {
    if BOOL_KEYS.contains(&name) {
        return as_bool(v)
            .map(drop)
            .ok_or_else(|| format!("Parameter '{name}' expects 'on' or 'off'"));
    }
    if SIZE_KEYS.contains(&name) {
        return match v {
            Val::Int(i) if *i < 0 => Err(format!(
                "Value '{i}' is out of range for parameter '{name}'"
            )),
            Val::Int(_) => Ok(()),
            Val::Str(s) if crate::util::parse_size(s).is_ok() => Ok(()),
            _ => Err(format!(
                "Parameter '{name}' expects a non-negative number below 2^64{SIZE_HELP}"
            )),
        };
    }
    if NUMBER_KEYS.contains(&name) {
        return match v {
            Val::Int(_) => Ok(()),
            Val::Str(s) if s.parse::<u64>().is_ok() => Ok(()),
            _ => Err(format!("Parameter '{name}' expects a number")),
        };
    }
    let text = v.shown();
    let one_of = |allowed: &[&str]| allowed.contains(&text.as_str());
    match name {
        "locking" if !matches!(v, Val::Bool(_)) && !one_of(&["auto", "on", "off"]) => {
            Err(format!("invalid parameter value: {text}"))
        }
        "detect-zeroes" if !one_of(&["off", "on", "unmap"]) => {
            Err(format!("invalid parameter value: {text}"))
        }
        "aio" if !one_of(&["threads", "native", "io_uring"]) => {
            Err(format!("invalid parameter value: {text}"))
        }
        "discard" if !one_of(&["ignore", "off", "unmap", "on"]) => {
            Err("Invalid discard option".into())
        }
        "overlap-check" | "overlap-check.template"
            if !one_of(&["none", "constant", "cached", "all"]) =>
        {
            Err(format!(
                "Unsupported value '{text}' for qcow2 option 'overlap-check'. Allowed are any \
                 of the following: none, constant, cached, all"
            ))
        }
        "node-name" if !valid_id(&text) => Err(format!("Invalid node-name: '{text}'")),
        _ => Ok(()),
    }
}

fn get<'a>(opts: &'a [(String, Val)], key: &str) -> Option<&'a Val> {
    opts.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn is_on(opts: &[(String, Val)], key: &str) -> Option<bool> {
    get(opts, key).and_then(as_bool)
}

/// Resolves what the user typed into an image to open, or qemu-img's refusal (the whole
/// message after the program name).
pub fn resolve(arg: &str, req: &Request) -> Result<ImageSpec, String> {
    let open_err = |m: String| format!("Could not open '{arg}': {m}");
    if req.image_opts && req.format.is_some() {
        return Err("--image-opts and --format are mutually exclusive".into());
    }
    let mut warnings = Vec::new();
    let mut opts: Vec<(String, Val)> = if req.image_opts {
        parse_opts(arg, &mut warnings)
    } else if let Some(j) = arg.strip_prefix("json:") {
        parse_json(j).map_err(open_err)?
    } else {
        vec![("file.filename".into(), Val::Str(arg.into()))]
    };
    if req.force_share {
        if req.image_opts && is_on(&opts, "force-share") == Some(false) {
            return Err("--force-share/-U conflicts with image options".into());
        }
        opts.push(("force-share".into(), Val::Bool(true)));
    }
    if let (Some(f), false) = (req.format, req.image_opts) {
        opts.push(("driver".into(), Val::Str(f.into())));
    }
    let driver = match get(&opts, "driver") {
        Some(Val::Str(d)) => Some(d.clone()),
        _ => None,
    };
    let has_file_opts = opts.iter().any(|(k, _)| k.starts_with("file."));
    // The file node's options: under "file." below a format, at the top for driver=file.
    let (format, file_prefix) = match driver.as_deref() {
        None => (Format::Probe, "file."),
        Some("qcow2") => (Format::Qcow2, "file."),
        Some("raw") => (Format::Raw, "file."),
        Some("file" | "host_device" | "host_cdrom") => (Format::Raw, ""),
        Some(d) if QEMU_FORMATS.contains(&d) || QEMU_PROTOCOLS.contains(&d) => {
            return Err(open_err(format!(
                "the '{d}' driver is not supported by qdirty (qcow2 or raw over a file only)"
            )))
        }
        Some(d) => return Err(open_err(format!("Unknown driver '{d}'"))),
    };
    if file_prefix == "file." {
        if let Some(Val::Str(node)) = get(&opts, "file") {
            return Err(open_err(if has_file_opts {
                "Cannot reference an existing block device with additional options or a new \
                 filename"
                    .into()
            } else {
                format!("Cannot find device='{node}' nor node-name='{node}'")
            }));
        }
        if driver.is_none() && !has_file_opts {
            return Err(open_err("Must specify either driver or file".into()));
        }
        if !has_file_opts {
            return Err(open_err(
                "A block device must be specified for \"file\"".into(),
            ));
        }
    }
    let protocol = match get(&opts, &format!("{file_prefix}driver")) {
        Some(Val::Str(d)) => d.clone(),
        _ => driver
            .clone()
            .filter(|_| file_prefix.is_empty())
            .unwrap_or_else(|| "file".into()),
    };
    match protocol.as_str() {
        "file" | "host_device" | "host_cdrom" => {}
        "qcow2" | "raw" => {
            return Err(open_err(
                "A block device must be specified for \"file\"".into(),
            ))
        }
        d if QEMU_FORMATS.contains(&d) || QEMU_PROTOCOLS.contains(&d) => {
            return Err(open_err(format!(
                "the '{d}' driver is not supported by qdirty (qcow2 or raw over a file only)"
            )))
        }
        d => return Err(open_err(format!("Unknown driver '{d}'"))),
    }
    // Every option belongs to the format node or to the file node.
    let format_name = if format == Format::Raw && file_prefix == "file." {
        "raw"
    } else {
        "qcow2"
    };
    for (k, v) in &opts {
        let (node_key, known) = match k.strip_prefix(file_prefix) {
            Some(fk) if !file_prefix.is_empty() || FILE_KEYS.contains(&fk) => {
                (fk, COMMON_KEYS.contains(&fk) || FILE_KEYS.contains(&fk))
            }
            _ if file_prefix.is_empty() => (k.as_str(), COMMON_KEYS.contains(&k.as_str())),
            _ => {
                let own = if format_name == "raw" {
                    RAW_KEYS
                } else {
                    QCOW2_KEYS
                };
                (
                    k.as_str(),
                    COMMON_KEYS.contains(&k.as_str()) || own.contains(&k.as_str()),
                )
            }
        };
        if !known {
            return Err(open_err(
                if k.starts_with(file_prefix) && !file_prefix.is_empty() {
                    format!("Block protocol 'file' doesn't support the option '{node_key}'")
                } else {
                    format!("Block format '{format_name}' does not support the option '{node_key}'")
                },
            ));
        }
        if node_key != "filename" && node_key != "driver" {
            check_value(node_key, v).map_err(open_err)?;
        }
    }
    let filename = match get(&opts, &format!("{file_prefix}filename")) {
        Some(Val::Str(f)) if !f.is_empty() => f.clone(),
        _ => {
            return Err(open_err(format!(
                "The '{protocol}' block driver requires a file name"
            )))
        }
    };
    if protocol != "file" {
        use std::os::unix::fs::FileTypeExt;
        let device = std::fs::metadata(&filename)
            .map(|m| m.file_type().is_block_device() || m.file_type().is_char_device())
            .unwrap_or(false);
        if !device {
            return Err(open_err(format!(
                "'{protocol}' driver requires '{filename}' to be either a character or block \
                 device"
            )));
        }
    }
    let read_only = is_on(&opts, "read-only") == Some(true)
        || is_on(&opts, &format!("{file_prefix}read-only")) == Some(true);
    let force_share = is_on(&opts, "force-share") == Some(true)
        || is_on(&opts, &format!("{file_prefix}force-share")) == Some(true);
    if req.write && read_only {
        return Err(open_err("Block node is read-only".into()));
    }
    if force_share && req.write {
        return Err(open_err(
            "force-share=on can only be used with read-only images".into(),
        ));
    }
    let locking = match get(&opts, &format!("{file_prefix}locking")) {
        Some(Val::Bool(b)) => *b,
        Some(v) => v.shown() != "off",
        None => true,
    };
    Ok(ImageSpec {
        arg: arg.to_string(),
        filename,
        format,
        locking,
        force_share,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(arg: &str, image_opts: bool) -> Result<ImageSpec, String> {
        resolve(
            arg,
            &Request {
                image_opts,
                format: None,
                write: true,
                force_share: false,
            },
        )
    }

    /// Expected values: qemu-img 10.0.2 `bitmap --add` with the same specification.
    #[test]
    fn accepted_specifications() {
        for (arg, opts) in [
            ("driver=qcow2,file.driver=file,file.filename=a.qcow2", true),
            ("driver=qcow2,file.filename=a.qcow2", true),
            ("file.filename=a.qcow2", true),
            ("driver=qcow2,file.filename=a.qcow2,file.locking=off", true),
            ("driver=qcow2,file.filename=a.qcow2,cache.direct=on", true),
            ("driver=qcow2,file.filename=a.qcow2,", true),
            (
                r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"}}"#,
                false,
            ),
            (
                r#"json:{"file":{"driver":"file","filename":"a.qcow2"}}"#,
                false,
            ),
            (
                r#"json:{"driver":"qcow2","file.filename":"a.qcow2"}"#,
                false,
            ),
            (
                r#"json:{"driver":"qcow2","file":{"filename":"a.qcow2"},"cache-size":"1M"}"#,
                false,
            ),
            (
                r#"json:{"driver":"qcow2","file":{"filename":"a.qcow2"},"lazy-refcounts":"on"}"#,
                false,
            ),
        ] {
            let s = rw(arg, opts).unwrap_or_else(|e| panic!("{arg}: {e}"));
            assert_eq!(s.filename, "a.qcow2", "{arg}");
        }
        let s = rw(
            r#"json:{"driver":"qcow2","file":{"filename":"a.qcow2","locking":false}}"#,
            false,
        )
        .unwrap();
        assert!(!s.locking);
        let s = rw("driver=qcow2,file.filename=a.qcow2,driver=raw", true).unwrap();
        assert_eq!(s.format, Format::Raw);
    }

    #[test]
    fn refusals() {
        for (arg, opts, msg) in [
            (
                "a.qcow2",
                true,
                "Cannot find device='a.qcow2' nor node-name='a.qcow2'",
            ),
            (
                "driver=qcow2",
                true,
                "A block device must be specified for \"file\"",
            ),
            (
                "driver=qcow2,file.driver=file",
                true,
                "The 'file' block driver requires a file name",
            ),
            (
                "driver=nonsense,file.filename=a",
                true,
                "Unknown driver 'nonsense'",
            ),
            (
                "driver=qcow2,file.filename=a,bogus=1",
                true,
                "Block format 'qcow2' does not support the option 'bogus'",
            ),
            (
                "driver=qcow2,file.filename=a,file.bogus=1",
                true,
                "Block protocol 'file' doesn't support the option 'bogus'",
            ),
            (
                "driver=qcow2,file.filename=a,lazy-refcounts=maybe",
                true,
                "Parameter 'lazy-refcounts' expects 'on' or 'off'",
            ),
            (
                "driver=qcow2,file.filename=a,file.locking=maybe",
                true,
                "invalid parameter value: maybe",
            ),
            (
                "driver=qcow2,file.filename=a,read-only=on",
                true,
                "Block node is read-only",
            ),
            (
                "driver=qcow2,file.filename=a,force-share=on",
                true,
                "force-share=on can only be used with read-only images",
            ),
            (
                "json:",
                false,
                "Could not parse the JSON options: Expecting a JSON value",
            ),
            (
                r#"json:{"driver":"qcow2""#,
                false,
                "Could not parse the JSON options: JSON parse error, premature EOI",
            ),
            (
                r#"json:{"driver":"qcow2","driver":"raw"}"#,
                false,
                "Could not parse the JSON options: JSON parse error, duplicate key",
            ),
            ("json:[]", false, "Invalid JSON object given"),
            ("json:{}", false, "Must specify either driver or file"),
            (
                r#"json:{"driver":"qcow2","file":{"filename":"a"},"x":[1]}"#,
                false,
                "Block format 'qcow2' does not support the option 'x.0'",
            ),
            (
                r#"json:{"driver":"qcow2","file":{"filename":"a"},"cache-size":-1}"#,
                false,
                "Value '-1' is out of range for parameter 'cache-size'",
            ),
            ("", false, "The 'file' block driver requires a file name"),
        ] {
            let e = rw(arg, opts).unwrap_err();
            assert_eq!(e, format!("Could not open '{arg}': {msg}"), "{arg}");
        }
    }
}
