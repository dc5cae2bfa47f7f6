//! Generates the CSI services (proto/csi/v1/csi.proto) with protoc (Debian
//! `protobuf-compiler`, or PROTOC=path). The client is generated too, for the tests.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/csi/v1/csi.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&[proto], &["../proto"])?;
    Ok(())
}
