fn main() -> Result<(), Box<dyn std::error::Error>> {
    // serde on every message: the console's JSON API (`/api/v1/…`) speaks
    // the gRPC messages as JSON, so the two surfaces cannot drift apart.
    // Missing fields take their protobuf defaults; unknown ones are an
    // error that names them.
    tonic_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default, deny_unknown_fields)]")
        .compile_protos(&["tidemark.proto"], &["."])?;
    Ok(())
}
