//! Generated gRPC code for the `cleanroom.v1` package; nothing here is written by hand.
#![allow(missing_docs, clippy::all)]

/// Messages, clients and servers of `proto/cleanroom/v1/cleanroom.proto`.
pub mod v1 {
    tonic::include_proto!("cleanroom.v1");

    /// Encoded `FileDescriptorSet` of the package, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/cleanroom_descriptor.bin"));
}
