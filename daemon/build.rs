//! Generates the node daemon API (proto/berth/v1/daemon.proto) with protoc
//! (Debian `protobuf-compiler`, or PROTOC=path).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/berth/v1/daemon.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&[proto], &["../proto"])?;
    Ok(())
}
