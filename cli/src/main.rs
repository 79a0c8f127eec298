//! `qdirty`: qemu-img bitmap compatible bitmap changes, plus what qemu-img cannot do offline
//! (listing without loading, dumping dirty extents, checking bitmap refcounts).
// Standard output goes through `out` (its errors are handled there): no `print!` elsewhere.
#![deny(clippy::print_stdout)]

mod cmd_bitmap;
mod cmd_check;
mod cmd_create;
mod cmd_dump;
mod cmd_info;
mod common;
mod getopt;
mod help;
mod imgspec;
mod open;
mod out;
mod util;

use std::ffi::OsString;
use std::process::ExitCode;

pub use common::{fail, usage_fail, Res};
use help::USAGE;
use out::{out, outln};

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "qdirty: internal error (please report): {}{at}",
            msg.replace('\n', " ")
        );
        std::process::exit(2);
    }));
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let r = run(&argv);
    out::flush_out();
    match r {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("{}", f.text());
            ExitCode::from(f.code)
        }
    }
}

fn run(argv: &[OsString]) -> Res<u8> {
    let Some(cmd) = argv.first() else {
        return Err(fail("no command given (qdirty --help lists the commands)"));
    };
    let rest = &argv[1..];
    match cmd.to_string_lossy().as_ref() {
        "--help" | "-h" | "help" => {
            out!("{USAGE}");
            Ok(0)
        }
        "--version" | "-V" => {
            outln!(
                "qdirty {} (libqdirty {})",
                env!("CARGO_PKG_VERSION"),
                qdirty::VERSION
            );
            Ok(0)
        }
        "info" => cmd_info::run(rest),
        "bitmap" => cmd_bitmap::run(rest),
        "dump" => cmd_dump::run(rest),
        "check" => cmd_check::run(rest),
        "create" => cmd_create::run(rest),
        other => Err(fail(format!(
            "unknown command '{other}' (qdirty --help lists them)"
        ))),
    }
}
