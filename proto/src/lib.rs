//! Generated gRPC types and stubs for `stride.v1` (see `stride/v1/stride.proto`).
//!
//! This crate owns the wire contract: the generated code, and in [`client`]
//! the parts of it that are not in the `.proto` (the token metadata, client
//! TLS). No job logic, no validation. Both binaries depend on it; the
//! coordinator serves `Coordinator`, workers are its clients.

pub mod client;

/// Bumped on every incompatible change of the `.proto` files; checked at
/// registration together with the crate version.
pub const PROTOCOL_VERSION: u32 = 1;

#[allow(missing_docs, unused_qualifications, clippy::all)]
pub mod v1 {
    tonic::include_proto!("stride.v1");
}
