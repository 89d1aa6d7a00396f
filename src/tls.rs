//! Dialing the edge: TCP (nodelay, bounded by the connect timeout) then TLS with SNI, verified
//! against the public web roots plus any `--ca-file`.
//!
//! `--connect` changes only where the TCP connection goes; SNI and certificate verification keep
//! using the VM's name, so a private edge or a test bed is verified exactly like the real one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// What went wrong while dialing, coarse enough to decide on retries and exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialErrorKind {
    /// The name did not resolve.
    Resolve,
    /// TCP connection refused: nothing listens (yet).
    Refused,
    /// Reset or closed before TLS completed: typical of a VM still booting behind the edge.
    Reset,
    /// No answer within the connect timeout.
    Timeout,
    /// The certificate was not acceptable (untrusted, expired, wrong name).
    Certificate,
    /// The TLS handshake failed for another reason (alert, protocol).
    Tls,
    /// Other socket errors.
    Io,
}

/// A failed dial, naming the host and the cause in one line.
#[derive(Debug, thiserror::Error)]
#[error("{host}: {message}")]
pub struct DialError {
    pub kind: DialErrorKind,
    pub host: String,
    pub message: String,
}

impl DialError {
    /// Worth retrying while a VM boots: refused, reset, timed out.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            DialErrorKind::Refused | DialErrorKind::Reset | DialErrorKind::Timeout
        )
    }
}

/// How to reach and verify the edge.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub ca_files: Vec<PathBuf>,
    pub insecure: bool,
    /// Dial this `host:port` instead of the target name.
    pub connect: Option<String>,
    pub connect_timeout: Duration,
}

/// Ready-to-use dialer: the rustls config is built once.
#[derive(Clone)]
pub struct Dialer {
    connector: TlsConnector,
    connect: Option<String>,
    timeout: Duration,
    insecure: bool,
}

impl Dialer {
    pub fn new(opts: &TlsOptions) -> anyhow::Result<Dialer> {
        let config = client_config(&opts.ca_files, opts.insecure)?;
        Ok(Dialer {
            connector: TlsConnector::from(Arc::new(config)),
            connect: opts.connect.clone(),
            timeout: opts.connect_timeout,
            insecure: opts.insecure,
        })
    }

    /// TCP connect (to `--connect` if set) and TLS handshake with SNI = `name`.
    pub async fn dial(&self, name: &str, port: u16) -> Result<TlsStream<TcpStream>, DialError> {
        self.dial_over(name, port, |tcp| tcp).await
    }

    /// [`Dialer::dial`], with TLS running over `wrap(tcp)` (the proxy puts a read buffer there).
    #[tracing::instrument(level = "debug", skip(self, wrap))]
    pub async fn dial_over<IO>(
        &self,
        name: &str,
        port: u16,
        wrap: impl FnOnce(TcpStream) -> IO,
    ) -> Result<TlsStream<IO>, DialError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        if self.insecure {
            eprintln!("vtun: warning: --insecure: the certificate of {name} is NOT verified");
        }
        let err = |kind, message: String| DialError {
            kind,
            host: format!("{name}:{port}"),
            message,
        };
        let addr = match &self.connect {
            Some(a) => a.clone(),
            None => format!("{name}:{port}"),
        };
        let server_name = ServerName::try_from(name.to_string()).map_err(|_| {
            err(
                DialErrorKind::Resolve,
                format!("invalid server name {name:?}"),
            )
        })?;
        let timeout = self.timeout;
        let work = async {
            let tcp = connect_tcp(&addr).await.map_err(|(kind, m)| err(kind, m))?;
            let tls = self
                .connector
                .connect(server_name, wrap(tcp))
                .await
                .map_err(|e| {
                    let (kind, m) = classify_tls_error(&e);
                    err(kind, m)
                })?;
            let (_, conn) = tls.get_ref();
            tracing::debug!(
                version = ?conn.protocol_version(),
                suite = ?conn.negotiated_cipher_suite().map(|s| s.suite()),
                "TLS established"
            );
            Ok(tls)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(err(
                DialErrorKind::Timeout,
                format!(
                    "no answer within {}s (--connect-timeout)",
                    timeout.as_secs_f64()
                ),
            )),
        }
    }
}

async fn connect_tcp(addr: &str) -> Result<TcpStream, (DialErrorKind, String)> {
    let addrs: Vec<_> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| {
            (
                DialErrorKind::Resolve,
                format!("cannot resolve {addr}: {e}"),
            )
        })?
        .collect();
    if addrs.is_empty() {
        return Err((DialErrorKind::Resolve, format!("cannot resolve {addr}")));
    }
    let mut last = None;
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some((a, e)),
        }
    }
    // `last` is set: the loop ran at least once and every iteration failed.
    let (a, e) = last.ok_or((DialErrorKind::Io, "no address".to_string()))?;
    let kind = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => DialErrorKind::Refused,
        std::io::ErrorKind::ConnectionReset => DialErrorKind::Reset,
        std::io::ErrorKind::TimedOut => DialErrorKind::Timeout,
        _ => DialErrorKind::Io,
    };
    let what = match kind {
        DialErrorKind::Refused => "connection refused".to_string(),
        _ => e.to_string(),
    };
    Err((kind, format!("{what} (dialing {a})")))
}

fn classify_tls_error(e: &std::io::Error) -> (DialErrorKind, String) {
    if let Some(inner) = e.get_ref() {
        if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
            return match tls {
                rustls::Error::InvalidCertificate(c) => (
                    DialErrorKind::Certificate,
                    format!("{} (see --ca-file)", describe_cert_error(c)),
                ),
                rustls::Error::AlertReceived(a) => (
                    DialErrorKind::Tls,
                    format!("TLS handshake failed: the edge sent alert {a:?}"),
                ),
                other => (DialErrorKind::Tls, format!("TLS handshake failed: {other}")),
            };
        }
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe => (
            DialErrorKind::Reset,
            "connection closed during the TLS handshake (unknown host at the edge, or not ready yet)"
                .to_string(),
        ),
        _ => (DialErrorKind::Io, format!("TLS handshake failed: {e}")),
    }
}

fn describe_cert_error(c: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match c {
        C::UnknownIssuer => "certificate not trusted: unknown issuer".into(),
        C::Expired | C::ExpiredContext { .. } => "certificate has expired".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => "certificate is not valid yet".into(),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "certificate is not valid for this name".into()
        }
        C::Revoked => "certificate has been revoked".into(),
        C::BadSignature => "certificate has a bad signature".into(),
        other => format!("certificate rejected: {other:?}"),
    }
}

/// ring's suites with AES-128-GCM offered first, as browsers do. Everything the edge relays is
/// already SSH-encrypted; with hardware AES, 10 rounds instead of 14 take about a fifth off the
/// TLS encryption, on our side and on the edge's. Servers that pick by the client's order (rustls,
/// and so `vtun gateway`) use it; others choose as before. Nothing is dropped from the list.
pub fn client_provider() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite as S;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            S::TLS13_AES_128_GCM_SHA256
                | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

/// Build the client config: webpki roots + extra CA files, or no verification at all.
pub fn client_config(ca_files: &[PathBuf], insecure: bool) -> anyhow::Result<ClientConfig> {
    let provider = Arc::new(client_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for file in ca_files {
            for cert in load_certs(file)? {
                roots.add(cert).map_err(|e| {
                    anyhow::anyhow!("bad CA certificate in {}: {e}", file.display())
                })?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(config)
}

/// Read every certificate from a PEM file.
pub fn load_certs(file: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    use anyhow::Context;
    let data =
        std::fs::read(file).with_context(|| format!("cannot read CA file {}", file.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &data[..])
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot parse PEM in {}", file.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate found in {}", file.display());
    }
    Ok(certs)
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_is_offered_first_and_nothing_is_dropped() {
        let ours: Vec<_> = client_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(ours[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let mut all: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let mut sorted = ours.clone();
        sorted.sort_by_key(|s| u16::from(*s));
        all.sort_by_key(|s| u16::from(*s));
        assert_eq!(sorted, all);
    }
}
