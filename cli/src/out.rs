//! Standard output for every command. A reader that closed its end of the pipe
//! (`qdirty info IMG | head -1`) has what it wanted: the rest of the output is dropped and the
//! command goes on to its usual exit status, as `dump` does. Any other write error (a full
//! disk behind a redirection, EIO) is reported, and the command exits with status 1: output
//! that could not be written is never taken for output that was. That exit is immediate, so
//! the commands print only while no image is open read-write (each closes its image first).

use std::fmt::Arguments;
use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write met a closed pipe: later output is dropped.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `args` to standard output (see the module's comment for errors).
pub fn write_out(args: Arguments) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let r = std::io::stdout().lock().write_fmt(args);
    settle(r);
}

/// Writes `bytes` to standard output (see the module's comment for errors).
pub fn write_out_bytes(bytes: &[u8]) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let r = std::io::stdout().lock().write_all(bytes);
    settle(r);
}

/// Flushes standard output before the command exits (a last line without a newline would
/// otherwise be written, and its error lost, after `main` returns).
pub fn flush_out() {
    if !CLOSED.load(Ordering::Relaxed) {
        settle(std::io::stdout().lock().flush());
    }
}

fn settle(r: std::io::Result<()>) {
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::BrokenPipe => CLOSED.store(true, Ordering::Relaxed),
        Err(e) => {
            eprintln!("qdirty: could not write the output: {e}");
            std::process::exit(1);
        }
    }
}

/// `print!` through [`write_out`].
macro_rules! out {
    ($($t:tt)*) => {
        $crate::out::write_out(format_args!($($t)*))
    };
}

/// `println!` through [`write_out`].
macro_rules! outln {
    () => {
        $crate::out::write_out(format_args!("\n"))
    };
    ($($t:tt)*) => {
        $crate::out::write_out(format_args!("{}\n", format_args!($($t)*)))
    };
}

pub(crate) use {out, outln};
