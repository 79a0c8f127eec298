//! `qdirty create`.

use std::ffi::OsString;
use std::path::Path;

use qdirty::Image;

use crate::common::*;
use crate::getopt::{opt, Arity};
use crate::help::*;
use crate::out::outln;
use crate::util::*;

// ---------------------------------------------------------------------------------------------

pub fn run(argv: &[OsString]) -> Res<u8> {
    let specs = [
        opt("help", Some('h'), Arity::Flag),
        opt("options", Some('o'), Arity::Value),
        opt("format", Some('f'), Arity::Value),
        opt("quiet", Some('q'), Arity::Flag),
    ];
    let Some(p) = parse(argv, &specs, "create", CREATE_HELP)? else {
        return Ok(0);
    };
    let mut cluster_size = 65536u64;
    for (k, v) in &p.opts {
        if *k != "options" {
            continue;
        }
        for kv in v.split(',').filter(|s| !s.is_empty()) {
            let (key, val) = kv.split_once('=').unwrap_or((kv, ""));
            match key {
                "cluster_size" => {
                    cluster_size = parse_size(val).map_err(|_| {
                        fail(format!("Parameter 'cluster_size' expects a non-negative number below 2^64 (got '{val}')"))
                    })?;
                }
                "compat" if matches!(val, "1.1" | "v3") => {}
                _ => {
                    return Err(fail(format!(
                        "create: option '{kv}' is not supported (only cluster_size)"
                    )))
                }
            }
        }
    }
    let [img_arg, size_arg] = p.args.as_slice() else {
        return Err(usage_error(
            "create",
            "create: expecting an image file name and a size",
        ));
    };
    let path = Path::new(img_arg);
    let s = size_arg.to_string_lossy();
    let size = match parse_size(&s) {
        Ok(v) => v,
        Err(SizeError::Invalid) => {
            return Err(fail(format!("Invalid image size specified: '{s}'.")))
        }
        Err(SizeError::TooBig) => {
            return Err(fail(
                "Invalid image size specified. Must be between 0 and 9223372036854775807.",
            ))
        }
    };
    let cs = u32::try_from(cluster_size).unwrap_or(u32::MAX).max(1);
    // Refusals (an existing file, a bad cluster size) come before the "Formatting" line,
    // which announces an image that is there.
    Image::create(path, size, cs).map_err(|e| img_err(path, &e))?;
    if !p.has("quiet") {
        outln!(
            "Formatting '{}', fmt=qcow2 cluster_size={cluster_size} size={size}",
            path.display()
        );
    }
    Ok(0)
}
