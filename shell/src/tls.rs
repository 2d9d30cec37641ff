//! TLS 1.3 configuration for both ends, and the client identity a DN reads from a certificate.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

/// ring's TLS 1.3 suites with the cheapest first for this CPU: AES-128-GCM where the CPU has
/// AES instructions (a tunnel's keys live for one session; 128 bits are ample and a fifth
/// cheaper than AES-256), ChaCha20-Poly1305 where it has none. rustls lets the client's order
/// decide, and both ends order alike, so a session uses the suite both run fastest.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = if has_aes_instructions() {
        vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ]
    } else {
        vec![
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
        ]
    };
    Arc::new(provider)
}

fn has_aes_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("pclmulqdq");
    #[cfg(target_arch = "aarch64")]
    return std::arch::is_aarch64_feature_detected!("aes");
    #[allow(unreachable_code)]
    false
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("cannot read a private key from {}", path.display()))
}

/// The CA certificates in `path`, as trust anchors.
pub fn roots(path: &Path) -> Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(path)? {
        store
            .add(cert)
            .with_context(|| format!("{} is not a usable CA certificate", path.display()))?;
    }
    Ok(Arc::new(store))
}

/// The identity a client certificate names: its subject common name.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Whether `revoked_clients` names the client, by identity or by certificate fingerprint.
pub fn is_revoked(revoked: &[String], identity: &str, fingerprint: &str) -> bool {
    revoked
        .iter()
        .any(|r| r == identity || r.eq_ignore_ascii_case(fingerprint))
}

/// Lower-case hex SHA-256 of the DER certificate, as listed in `revoked_clients`.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// Checks client certificates against the cluster's client CA, then against the revocation list
/// (identities or fingerprints). Refusals are logged here, where the reason is known.
#[derive(Debug)]
struct RevokingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Vec<String>,
}

impl ClientCertVerifier for RevokingVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let identity = identity_of(end_entity).unwrap_or_else(|| "<no common name>".into());
        if let Err(e) = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            // Not verified: the name is anyone's words, so it is logged escaped.
            tracing::warn!(client = ?identity, error = %e, "client refused: certificate not accepted");
            return Err(e);
        }
        if identity.chars().any(char::is_control) {
            // Identities go into logs, routes' reasons and tickets: no line breaks or escape
            // sequences, whoever the CA is.
            tracing::warn!(client = ?identity, "client refused: its common name has control characters");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        let print = fingerprint(end_entity);
        if is_revoked(&self.revoked, &identity, &print) {
            tracing::warn!(client = ?identity, fingerprint = %print, "client refused: revoked in cluster.toml");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The DN's TLS configuration: its own certificate, client certificates required.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
    revoked: Vec<String>,
) -> Result<rustls::ServerConfig> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots(client_ca)?, provider())
        .build()
        .context("cannot build the client certificate verifier")?;
    let verifier = Arc::new(RevokingVerifier { inner, revoked });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .with_context(|| format!("{} does not match {}", key.display(), cert.display()))?;
    config.alpn_protocols = vec![holdfast_proto::ALPN.to_vec()];
    Ok(config)
}

/// The EN's TLS configuration: trusts the cluster's server CA, presents its own certificate.
pub fn client_config(cert: &Path, key: &Path, server_ca: &Path) -> Result<rustls::ClientConfig> {
    client_config_with(roots(server_ca)?, load_certs(cert)?, load_key(key)?)
        .with_context(|| format!("{} does not match {}", key.display(), cert.display()))
}

/// The EN's TLS configuration from certificates already in memory (the lab's load client holds
/// thousands of identities).
pub fn client_config_with(
    server_roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(server_roots)
        .with_client_auth_cert(chain, key)
        .context("the client key does not match its certificate")?;
    config.alpn_protocols = vec![holdfast_proto::ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod cipher_tests {
    use super::*;

    #[test]
    fn the_cheapest_suite_for_this_cpu_comes_first_and_all_three_are_offered() {
        let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let first = if has_aes_instructions() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        } else {
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        };
        assert_eq!(suites.first(), Some(&first));
        assert_eq!(suites.len(), 3);
    }
}
