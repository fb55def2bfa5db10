//! `TlsError`: a handshake that failed.

use std::fmt;
use std::io;

/// A TLS connection could not be set up: the handshake failed (the server's
/// certificate is not trusted or does not name the server, no protocol in common, the
/// peer closed or reset the connection mid-handshake), or the target gave no server
/// name and none was set.
///
/// Its [`source`](std::error::Error::source) is the cause: a `rustls::Error` (also
/// through [`rustls_error`](Self::rustls_error)) or an `io::Error`. A pool reports it
/// as [`PoolError::Connect`](crate::PoolError::Connect); reach it through wrappers with
/// [`marina_core::find`].
///
/// ```
/// use marina_pool::tls::TlsError;
///
/// fn explain(err: &(dyn std::error::Error + 'static)) -> String {
///     match marina_core::find::<TlsError>(err) {
///         Some(tls) if tls.is_certificate_error() => {
///             format!("untrusted certificate from {:?}", tls.server_name())
///         }
///         Some(tls) => format!("tls failed: {tls}"),
///         None => format!("{err}"),
///     }
/// }
/// # let _ = explain;
/// ```
#[derive(Debug)]
pub struct TlsError {
    server_name: Option<String>,
    cause: Cause,
}

#[derive(Debug)]
enum Cause {
    Rustls(rustls::Error),
    Io(io::Error),
    NoServerName,
}

impl TlsError {
    /// The handshake with `server_name` failed with `error` (tokio-rustls's: a rustls
    /// error inside an `io::Error`, or the transport's own I/O error).
    pub(crate) fn handshake(server_name: String, error: io::Error) -> Self {
        let cause = if error.get_ref().is_some_and(|e| e.is::<rustls::Error>()) {
            let inner = error.into_inner().expect("checked above");
            Cause::Rustls(*inner.downcast::<rustls::Error>().expect("checked above"))
        } else {
            Cause::Io(error)
        };
        TlsError {
            server_name: Some(server_name),
            cause,
        }
    }

    pub(crate) fn no_server_name() -> Self {
        TlsError {
            server_name: None,
            cause: Cause::NoServerName,
        }
    }

    /// The name the server's certificate was checked against; `None` when there was
    /// none to check (the target gave none and none was set).
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// The rustls error, if rustls refused the handshake (as opposed to an I/O error).
    pub fn rustls_error(&self) -> Option<&rustls::Error> {
        match &self.cause {
            Cause::Rustls(e) => Some(e),
            _ => None,
        }
    }

    /// The I/O error, if the transport failed mid-handshake (a reset, an EOF).
    pub fn io_error(&self) -> Option<&io::Error> {
        match &self.cause {
            Cause::Io(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the server's certificate was refused (an unknown issuer, a name it does
    /// not carry, expired, …), or the server refused ours.
    pub fn is_certificate_error(&self) -> bool {
        use rustls::AlertDescription as A;
        match self.rustls_error() {
            Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
                true
            }
            Some(rustls::Error::AlertReceived(alert)) => matches!(
                alert,
                A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::CertificateRequired
            ),
            _ => false,
        }
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.server_name, &self.cause) {
            (_, Cause::NoServerName) => f.write_str(
                "tls: the target gives no server name to verify (set one with TlsConfig::server_name)",
            ),
            (Some(name), _) => write!(f, "tls handshake with {name} failed"),
            (None, _) => f.write_str("tls handshake failed"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            Cause::Rustls(e) => Some(e),
            Cause::Io(e) => Some(e),
            Cause::NoServerName => None,
        }
    }
}
