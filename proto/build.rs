//! Generates the gRPC code from `proto/dvs/v1/dvs.proto` with protox (a
//! protobuf compiler in Rust): no `protoc` needed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/dvs/v1/dvs.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
