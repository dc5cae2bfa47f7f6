//! Generates the CSI services (proto/csi/v1/csi.proto); the client is generated too, for the
//! tests. The .proto is parsed by protox (Rust), so no protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/csi/v1/csi.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["../proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
