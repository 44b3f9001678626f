//! Compiles `proto/writeback/v1/*.proto` in pure Rust (protox): no `protoc` binary needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = ["writeback/v1/writeback.proto", "writeback/v1/agent.proto"];
    for file in &files {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }
    let fds = protox::compile(files, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("writeback_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // `AgentLink.Connect` would clash with the generated `connect` constructor: clients are
        // built from a `Channel` with `new` instead.
        .build_transport(false)
        // Messages holding passwords get a hand-written Debug that redacts them (relay::proto).
        .skip_debug([
            ".writeback.v1.ResetPassword",
            ".writeback.v1.ChangePassword",
        ])
        .compile_fds(fds)?;
    Ok(())
}
