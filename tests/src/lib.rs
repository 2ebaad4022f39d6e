//! Helpers shared by the end-to-end tests live in `tests/tests/suite/common.rs` (the tests are one binary, `tests/tests/suite/main.rs`).
