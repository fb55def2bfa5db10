//! `TlsConfig`: the client's TLS settings.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// A client's TLS settings: a `rustls::ClientConfig` (trusted roots, protocol versions,
/// ALPN, client certificate) and, optionally, a fixed server name to verify instead of
/// the target's.
///
/// # Sharing
///
/// `Clone`: clones share one `ClientConfig` behind an `Arc` (and its session cache, so
/// every connection made with them can resume sessions). Settings changed on a clone
/// (`alpn`, `server_name`) apply to that clone only.
///
/// # Examples
///
/// ```
/// use marina_pool::tls::TlsConfig;
/// # let pem = rcgen::generate_simple_self_signed(vec!["db.internal".into()]).unwrap().cert.pem();
///
/// let tls = TlsConfig::from_ca_pem(pem.as_bytes())?
///     .server_name("db.internal")?
///     .alpn(["h2", "http/1.1"]);
/// assert_eq!(tls.client_config().alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
/// # Ok::<(), marina_pool::tls::TlsConfigError>(())
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) config: Arc<ClientConfig>,
    pub(crate) server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let alpn: Vec<_> = self
            .config
            .alpn_protocols
            .iter()
            .map(|p| String::from_utf8_lossy(p))
            .collect();
        f.debug_struct("TlsConfig")
            .field("server_name", &self.server_name)
            .field("alpn", &alpn)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Settings from a `ClientConfig` of your own (any crypto provider, client
    /// certificates, a custom verifier).
    pub fn new(config: impl Into<Arc<ClientConfig>>) -> Self {
        TlsConfig {
            config: config.into(),
            server_name: None,
        }
    }

    /// Trusts `roots`: the *ring* provider with X25519 as the key exchange offered first
    /// (then P-256, P-384), TLS 1.2 and 1.3, no client certificate.
    pub fn with_roots(roots: impl Into<Arc<RootCertStore>>) -> Self {
        // rustls 0.23.48 deprecates ring's provider for its lack of post-quantum key
        // exchange; see the module docs ("Why ring") for the choice and the way out.
        #[allow(deprecated)]
        let mut provider = rustls::crypto::ring::default_provider();
        // That version also lists P-384 first, so a client sends a P-384 key share, which
        // ring computes with generic bignum code: with X25519 first a full handshake
        // takes 3.7 times less CPU (docs/BENCHMARKS.md, "TLS connects").
        use rustls::crypto::ring::kx_group::{SECP256R1, SECP384R1, X25519};
        provider.kx_groups = vec![X25519, SECP256R1, SECP384R1];
        let provider = Arc::new(provider);
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self::new(config)
    }

    /// Trusts the CA certificates in `pem` (one or more `CERTIFICATE` blocks; other
    /// blocks are skipped). Fails if there is none, or one cannot be parsed or used as
    /// a trust anchor.
    pub fn from_ca_pem(pem: &[u8]) -> Result<Self, TlsConfigError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsConfigError::new("the CA certificates cannot be read", e))?;
        Self::from_ca_certs(certs)
    }

    /// Trusts the CA certificates of the PEM file at `path`, as
    /// [`from_ca_pem`](Self::from_ca_pem).
    pub fn from_ca_file(path: impl AsRef<Path>) -> Result<Self, TlsConfigError> {
        let path = path.as_ref();
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsConfigError::new(format!("cannot read {}", path.display()), e))?;
        Self::from_ca_certs(certs)
            .map_err(|e| TlsConfigError::msg(format!("{}: {}", path.display(), e.message)))
    }

    fn from_ca_certs(certs: Vec<CertificateDer<'static>>) -> Result<Self, TlsConfigError> {
        if certs.is_empty() {
            return Err(TlsConfigError::msg("no CA certificate found"));
        }
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| TlsConfigError::new("a CA certificate cannot be trusted", e))?;
        }
        Ok(Self::with_roots(roots))
    }

    /// Trusts the operating system's roots (rustls-native-certs: the system's
    /// certificate store, or the file named by `SSL_CERT_FILE`). Certificates the
    /// store holds but rustls cannot use are skipped; fails only if none is left.
    #[cfg(feature = "tls-native-roots")]
    pub fn native_roots() -> Result<Self, TlsConfigError> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (_added, _ignored) = roots.add_parsable_certificates(found.certs);
        if roots.is_empty() {
            let why = found
                .errors
                .first()
                .map_or_else(|| "the store is empty".to_string(), |e| e.to_string());
            return Err(TlsConfigError::msg(format!(
                "no usable root certificate in the system's store ({why})"
            )));
        }
        Ok(Self::with_roots(roots))
    }

    /// Verifies every server's certificate against `name` (a DNS name or an IP
    /// address) instead of the name the target gives: for backends addressed by IP
    /// whose certificates name a host. Fails if `name` is neither.
    pub fn server_name(mut self, name: impl AsRef<str>) -> Result<Self, TlsConfigError> {
        let name = name.as_ref();
        let parsed = ServerName::try_from(name.to_string())
            .map_err(|e| TlsConfigError::new(format!("invalid server name {name:?}"), e))?;
        self.server_name = Some(parsed);
        Ok(self)
    }

    /// The protocols offered by ALPN, most preferred first (`["h2", "http/1.1"]`);
    /// empty for none (the default). Read the server's choice from the stream
    /// ([`alpn_protocol`](super::alpn_protocol)).
    pub fn alpn<I, P>(mut self, protocols: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        Arc::make_mut(&mut self.config).alpn_protocols =
            protocols.into_iter().map(|p| p.as_ref().to_vec()).collect();
        self
    }

    /// The `ClientConfig` connections are made with.
    pub fn client_config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// The server name set with [`server_name`](Self::server_name), if any.
    pub fn fixed_server_name(&self) -> Option<&ServerName<'static>> {
        self.server_name.as_ref()
    }
}

/// TLS settings that cannot be used: an unreadable CA file, no certificate in it, an
/// invalid server name.
#[derive(Debug)]
pub struct TlsConfigError {
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl TlsConfigError {
    fn new(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        TlsConfigError {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    fn msg(message: impl Into<String>) -> Self {
        TlsConfigError {
            message: message.into(),
            source: None,
        }
    }
}

impl fmt::Display for TlsConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            // The cause's text too: these errors end up in configuration reports.
            Some(s) => write!(f, "{}: {s}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for TlsConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_x25519_first_and_keeps_alpn_per_clone() {
        let tls = TlsConfig::with_roots(RootCertStore::empty());
        let groups: Vec<_> = tls
            .client_config()
            .crypto_provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(groups[0], rustls::NamedGroup::X25519, "{groups:?}");
        let h2 = tls.clone().alpn(["h2"]);
        assert_eq!(h2.client_config().alpn_protocols, [b"h2".to_vec()]);
        assert!(
            tls.client_config().alpn_protocols.is_empty(),
            "the clone alone"
        );
    }

    /// Runs with the `tls-native-roots` feature, on a machine with a CA store.
    #[cfg(feature = "tls-native-roots")]
    #[test]
    fn native_roots_load_where_the_system_has_some() {
        if std::path::Path::new("/etc/ssl/certs").exists() {
            TlsConfig::native_roots().expect("the system's roots");
        }
    }
}
