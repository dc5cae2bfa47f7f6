//! Generates the node daemon API (proto/berth/v1/daemon.proto). The .proto is parsed by protox
//! (a protobuf compiler written in Rust), so building berth needs no protoc on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/berth/v1/daemon.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["../proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
