//! The C ABI (stub).
