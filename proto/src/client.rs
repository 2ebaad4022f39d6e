//! What every client of the coordinator needs on the wire besides the
//! generated stubs: the job token in each request's metadata, and the TLS
//! settings of an `https://` URL. Shared by the worker, `coordinator
//! status` and the load generator, and by the server's token check.

use std::path::Path;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The metadata entry carrying the job token.
pub const AUTH_METADATA_KEY: &str = "authorization";

/// The metadata value for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A token that cannot travel in gRPC metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidToken;

impl std::fmt::Display for InvalidToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the job token must be printable ASCII")
    }
}

impl std::error::Error for InvalidToken {}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Debug, Clone)]
pub struct TokenInterceptor {
    value: MetadataValue<Ascii>,
}

impl TokenInterceptor {
    pub fn new(token: &str) -> Result<TokenInterceptor, InvalidToken> {
        let value = bearer(token).parse().map_err(|_| InvalidToken)?;
        Ok(TokenInterceptor { value })
    }
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(AUTH_METADATA_KEY, self.value.clone());
        Ok(request)
    }
}

/// Client TLS: trust `ca` (besides nothing else), present `identity`
/// (certificate, key) for mutual TLS, verify `domain` instead of the URL's
/// host. Errors name the file that could not be read.
pub fn client_tls(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
    domain: Option<&str>,
) -> std::io::Result<ClientTlsConfig> {
    let read = |p: &Path| {
        std::fs::read(p)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot read {}: {e}", p.display())))
    };
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(d) = domain {
        tls = tls.domain_name(d);
    }
    Ok(tls)
}
