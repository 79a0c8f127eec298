//! Warnings that are not errors (QEMU's `warn_report`), delivered to a process-wide handler.

use std::sync::RwLock;

type Handler = Box<dyn Fn(&str) + Send + Sync>;

static HANDLER: RwLock<Option<Handler>> = RwLock::new(None);

/// Installs the process-wide warning handler; None restores the default (stderr).
pub fn set_warning_handler(handler: Option<Handler>) {
    let mut h = HANDLER.write().unwrap_or_else(|e| e.into_inner());
    *h = handler;
}

/// Delivers a warning to the handler, or prints "qdirty: warning: MSG" on stderr.
pub(crate) fn warn(msg: &str) {
    let h = HANDLER.read().unwrap_or_else(|e| e.into_inner());
    match h.as_ref() {
        Some(f) => f(msg),
        None => eprintln!("qdirty: warning: {msg}"),
    }
}
