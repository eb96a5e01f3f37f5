//! The connection to another site's daemon: its gRPC API, with that site's
//! token on every request and TLS when its address says `https://`.

use std::time::Duration;

use tidemark_proto::v1::tidemark_client::TidemarkClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// Another site's daemon, as this site reaches it.
#[derive(Clone)]
pub struct Peer {
    /// `HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT`.
    pub address: String,
    /// That site's API token.
    pub token: String,
    /// PEM of the CA its certificate is signed by (`https://` only).
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// Presents the peer's token on every request.
#[derive(Clone, Debug)]
pub struct Token(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Token {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A client of a peer's API.
pub type Client = TidemarkClient<InterceptedService<Channel, Token>>;

/// An error with its causes, for messages (transport errors hide the
/// useful part in a source; a cause that repeats what was said is left
/// out).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// Connects to `peer`.
pub async fn connect(peer: &Peer) -> Result<Client, String> {
    let uri = if peer.address.contains("://") {
        peer.address.clone()
    } else {
        format!("http://{}", peer.address)
    };
    let mut endpoint = Channel::from_shared(uri.clone())
        .map_err(|e| format!("{} is not an address: {e}", peer.address))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10));
    if uri.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &peer.ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS for {}: {}", peer.address, error_chain(&e)))?;
    }
    let token = format!("Bearer {}", peer.token)
        .parse()
        .map_err(|_| format!("the token for {} cannot travel in a header", peer.address))?;
    let channel = endpoint.connect().await.map_err(|e| {
        let why = error_chain(&e);
        let hint = if why.contains("certificate") {
            " (--ca F names the CA that signed that site's certificate)"
        } else {
            ""
        };
        format!("cannot reach {}: {why}{hint}", peer.address)
    })?;
    Ok(TidemarkClient::with_interceptor(channel, Token(token))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// Checks that `peer` answers with its token and can take group `group` as
/// a replica (it does not hold the group as a primary, as this site would
/// when given its own address). Run before a replica is added, so a wrong
/// address or token is an error then, not a link that never comes up.
pub async fn probe(peer: &Peer, group: &str) -> Result<(), String> {
    let mut client = connect(peer).await?;
    let volumes = client
        .list_volumes(tidemark_proto::v1::ListVolumesRequest {})
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => format!(
                "the daemon at {} refused the token given for it: {}",
                peer.address,
                s.message()
            ),
            _ => format!(
                "the daemon at {} did not answer: {}",
                peer.address,
                s.message()
            ),
        })?
        .into_inner()
        .volumes;
    if let Some(v) = volumes
        .iter()
        .find(|v| v.group == group && v.role != "replica")
    {
        return Err(format!(
            "the daemon at {} holds group {group} (volume {}) as a primary: it cannot be its replica",
            peer.address, v.name
        ));
    }
    Ok(())
}
