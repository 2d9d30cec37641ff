//! Certificates and keys for a cluster: what `dn pki` writes and the lab uses.
//!
//! Two CAs: the server CA signs each DN's TLS certificate (ENs trust it), the client CA signs
//! each EN's certificate (DNs trust it; the certificate's common name is the client identity).
//! Each DN also gets an Ed25519 lease-signing key; its public half goes into `cluster.toml`.

use std::path::Path;

use anyhow::{Context, Result};
use holdfast_proto::cluster::check_name;
use holdfast_proto::lease::{encode_key, generate_signing_key};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

pub const SERVER_CA: &str = "server-ca.pem";
pub const CLIENT_CA: &str = "client-ca.pem";

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn write_public(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

fn named(name: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(vec![name.to_owned()])
        .with_context(|| format!("{name:?} is not usable as a certificate name"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    Ok(params)
}

fn make_ca(dir: &Path, file: &str, common_name: &str) -> Result<Issuer<'static, KeyPair>> {
    let mut params = named(common_name)?;
    params.subject_alt_names.clear();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_public(&dir.join(file), &cert.pem())?;
    write_private(
        &dir.join(file.replace(".pem", ".key.pem")),
        &key.serialize_pem(),
    )?;
    Ok(Issuer::new(params, key))
}

fn load_ca(dir: &Path, file: &str) -> Result<Issuer<'static, KeyPair>> {
    let cert_path = dir.join(file);
    let key_path = dir.join(file.replace(".pem", ".key.pem"));
    let cert = std::fs::read_to_string(&cert_path)
        .with_context(|| format!("cannot read {}", cert_path.display()))?;
    let key = std::fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key).with_context(|| format!("bad key {}", key_path.display()))?;
    Issuer::from_ca_cert_pem(&cert, key)
        .with_context(|| format!("bad CA certificate {}", cert_path.display()))
}

fn issue(
    dir: &Path,
    name: &str,
    usage: ExtendedKeyUsagePurpose,
    ca: &Issuer<'_, KeyPair>,
) -> Result<()> {
    let (cert, key) = sign(name, usage, ca)?;
    write_public(&dir.join(format!("{name}.crt.pem")), &cert.pem())?;
    write_private(&dir.join(format!("{name}.key.pem")), &key.serialize_pem())
}

/// A new key and a certificate naming `name`, signed by `ca`.
fn sign(
    name: &str,
    usage: ExtendedKeyUsagePurpose,
    ca: &Issuer<'_, KeyPair>,
) -> Result<(rcgen::Certificate, KeyPair)> {
    check_name("name", name).map_err(anyhow::Error::msg)?;
    let mut params = named(name)?;
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert, key))
}

/// Creates both CAs, a TLS certificate and lease key for every DN and a certificate for every
/// client in `dir`. Returns each DN's name and base64 public lease key, for `cluster.toml`.
pub fn generate(dir: &Path, dns: &[&str], clients: &[&str]) -> Result<Vec<(String, String)>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let server_ca = make_ca(dir, SERVER_CA, "Holdfast server CA")?;
    let client_ca = make_ca(dir, CLIENT_CA, "Holdfast client CA")?;
    let mut public_keys = Vec::new();
    for dn in dns {
        issue(dir, dn, ExtendedKeyUsagePurpose::ServerAuth, &server_ca)?;
        let key = generate_signing_key();
        write_private(
            &dir.join(format!("{dn}.lease.key")),
            &format!("{}\n", encode_key(&key.to_bytes())),
        )?;
        public_keys.push((dn.to_string(), encode_key(&key.verifying_key().to_bytes())));
    }
    for client in clients {
        add_client_with(dir, client, &client_ca)?;
    }
    Ok(public_keys)
}

fn add_client_with(dir: &Path, name: &str, ca: &Issuer<'_, KeyPair>) -> Result<()> {
    issue(dir, name, ExtendedKeyUsagePurpose::ClientAuth, ca)
}

/// Issues client certificates with the client CA in `dir`, in memory only: each name's DER
/// certificate and PKCS#8 key. For load tests that need thousands of identities.
pub fn issue_clients_in_memory(dir: &Path, names: &[String]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let ca = load_ca(dir, CLIENT_CA)?;
    names
        .iter()
        .map(|name| {
            let (cert, key) = sign(name, ExtendedKeyUsagePurpose::ClientAuth, &ca)?;
            Ok((cert.der().to_vec(), key.serialize_der()))
        })
        .collect()
}

/// Issues one more client certificate with the client CA already in `dir`.
pub fn add_client(dir: &Path, name: &str) -> Result<()> {
    let ca = load_ca(dir, CLIENT_CA)?;
    add_client_with(dir, name, &ca)
}
