//! tidemark's gRPC API: the types and service stubs generated from
//! `tidemark.proto` (package `tidemark.v1`). Nothing else lives here.

#![allow(missing_docs, missing_debug_implementations, clippy::all)]

/// Version 1 of the API.
pub mod v1 {
    tonic::include_proto!("tidemark.v1");
}
