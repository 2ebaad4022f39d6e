//! [`Refused`]: a start refused because of what the user asked (exit code
//! 2). A leaf module, so that what refuses (the start, the run directory
//! in `output.rs`, `main`) does not import what it is imported by.

/// A start that was refused because of what the user asked (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);
