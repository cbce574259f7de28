//! Generates the cleanroom.v1 code with the pure-Rust `protox` compiler, so no system `protoc` is
//! needed, and keeps the encoded descriptor set for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not baked in with env!: a build directory shared by clones at different
    // paths (CI's fresh clone and a working copy) reuses this script without recompiling it.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = proto_root.join("cleanroom/v1/cleanroom.proto");
    println!("cargo:rerun-if-changed={}", file.display());

    let fds = protox::compile([&file], [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("cleanroom_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Ordered maps keep responses (rejection counts, parameters) deterministic.
        .btree_map(".")
        // The review page's JSON is these same messages: one model for gRPC and the browser.
        .type_attribute(".cleanroom.v1", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
