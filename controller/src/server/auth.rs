//! Who may call: the services' TLS (agents' client certificates must name
//! the host they register) and the admin token.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::Error;

/// The files of the services' TLS: the controller's certificate and key
/// (PEM), and the CA that agents' client certificates must chain to.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: std::path::PathBuf,
}

impl TlsFiles {
    /// The server configuration: mutual TLS, a client certificate being
    /// required of agents (admin calls authenticate with the token).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming a file that cannot be read.
    pub fn server_config(&self) -> Result<tonic::transport::ServerTlsConfig, Error> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))
        };
        let id = tonic::transport::Identity::from_pem(read(&self.cert)?, read(&self.key)?);
        let ca = tonic::transport::Certificate::from_pem(read(&self.client_ca)?);
        Ok(tonic::transport::ServerTlsConfig::new()
            .identity(id)
            .client_ca_root(ca)
            .client_auth_optional(true))
    }
}

/// Is the DER certificate `leaf` valid for the DNS name `host`?
pub(super) fn cert_names(leaf: &[u8], host: &str) -> Result<(), String> {
    let der = rustls_pki_types::CertificateDer::from(leaf);
    let cert = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| format!("unreadable certificate: {e:?}"))?;
    let name = rustls_pki_types::ServerName::try_from(host)
        .map_err(|_| format!("`{host}` cannot be a certificate name"))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| format!("the client certificate does not name host {host}"))
}

/// Admin calls must carry `authorization: Bearer TOKEN` when the
/// controller has a token.
#[derive(Debug, Clone)]
pub struct TokenCheck {
    pub(super) token: Option<Arc<str>>,
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.token else {
            return Ok(req);
        };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match got {
            None => Err(Status::unauthenticated(
                "admin calls need the controller's token: pass --token or set DVS_TOKEN",
            )),
            Some(t) if same(t.as_bytes(), want.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("the admin token is wrong")),
        }
    }
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
