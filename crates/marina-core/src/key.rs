use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use http::HeaderName;

use crate::ext::HasExtensions;

/// Reads a key from a request: a session id for the affinity layer, a user or client
/// address for the limits. `None` means the request has none.
///
/// Implemented by [`HeaderKey`], [`CookieKey`], [`ClientIp`] and any
/// `Fn(&Req) -> Option<String>` closure. Keys longer than [`MAX_KEY_LEN`] bytes are
/// treated as absent (a client must not be able to make the layers store arbitrarily
/// large keys).
///
/// ```
/// use marina_core::{CookieKey, HeaderKey, KeyExtractor};
///
/// let req = http::Request::builder()
///     .header("x-user", "alice")
///     .header("cookie", "theme=dark; SESSION=abc123")
///     .body(())
///     .unwrap();
/// assert_eq!(HeaderKey::new("x-user").extract(&req).as_deref(), Some("alice"));
/// assert_eq!(CookieKey::new("SESSION").extract(&req).as_deref(), Some("abc123"));
/// let by_closure = |r: &http::Request<()>| Some(r.uri().path().to_string());
/// assert_eq!(by_closure.extract(&req).as_deref(), Some("/"));
/// ```
pub trait KeyExtractor<Req>: Send + Sync + 'static {
    /// The request's key, if it has one.
    fn extract(&self, req: &Req) -> Option<String>;
}

/// The longest key the extractors return, in bytes.
pub const MAX_KEY_LEN: usize = 512;

fn bounded(s: &str) -> Option<String> {
    (!s.is_empty() && s.len() <= MAX_KEY_LEN).then(|| s.to_string())
}

impl<F, Req> KeyExtractor<Req> for F
where
    F: Fn(&Req) -> Option<String> + Send + Sync + 'static,
{
    fn extract(&self, req: &Req) -> Option<String> {
        self(req).filter(|k| k.len() <= MAX_KEY_LEN)
    }
}

/// The value of one HTTP header.
#[derive(Debug, Clone)]
pub struct HeaderKey {
    name: HeaderName,
}

impl HeaderKey {
    /// Reads header `name`.
    ///
    /// # Panics
    ///
    /// If `name` is not a valid header name (a programming error: names are constants).
    pub fn new(name: &str) -> Self {
        HeaderKey {
            name: HeaderName::from_str(name).expect("a valid header name"),
        }
    }
}

impl<B> KeyExtractor<http::Request<B>> for HeaderKey {
    fn extract(&self, req: &http::Request<B>) -> Option<String> {
        bounded(req.headers().get(&self.name)?.to_str().ok()?.trim())
    }
}

/// The value of one cookie, from the request's `Cookie` headers.
#[derive(Debug, Clone)]
pub struct CookieKey {
    name: String,
}

impl CookieKey {
    /// Reads cookie `name`.
    pub fn new(name: impl Into<String>) -> Self {
        CookieKey { name: name.into() }
    }
}

impl<B> KeyExtractor<http::Request<B>> for CookieKey {
    fn extract(&self, req: &http::Request<B>) -> Option<String> {
        req.headers()
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k.trim() == self.name).then(|| v.trim().trim_matches('"'))
            })
            .and_then(bounded)
    }
}

/// The address of the peer a request came from, put in its extensions by the server
/// (or the app) that received it; read by [`ClientIp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// An IP network, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// A network that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidIpNet(pub String);

impl fmt::Display for InvalidIpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid IP network {:?} (want an address or address/prefix)",
            self.0
        )
    }
}

impl std::error::Error for InvalidIpNet {}

impl FromStr for IpNet {
    type Err = InvalidIpNet;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidIpNet(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(IpNet { addr, prefix })
    }
}

impl IpNet {
    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The client's IP address: the [`PeerAddr`] in the request's extensions, or — only
/// when that peer is a trusted proxy — the rightmost address in `X-Forwarded-For` that
/// is not itself a trusted proxy (addresses further left are set by the client and
/// can be forged).
///
/// ```
/// use marina_core::{ClientIp, KeyExtractor, PeerAddr};
///
/// let ip = ClientIp::new().trust_proxy("10.0.0.0/8".parse().unwrap());
/// let mut req = http::Request::builder()
///     .header("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.7")
///     .body(())
///     .unwrap();
/// req.extensions_mut().insert(PeerAddr("10.0.0.1:5555".parse().unwrap()));
/// // The proxy 10.0.0.1 is trusted, so is 10.0.0.7; 203.0.113.9 is the client.
/// assert_eq!(ip.extract(&req).as_deref(), Some("203.0.113.9"));
///
/// // From an untrusted peer the header is ignored.
/// req.extensions_mut().insert(PeerAddr("198.51.100.1:5555".parse().unwrap()));
/// assert_eq!(ip.extract(&req).as_deref(), Some("198.51.100.1"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ClientIp {
    trusted: Vec<IpNet>,
}

impl ClientIp {
    /// The peer address only; `X-Forwarded-For` is never trusted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts proxies in `net` to report the client's address in `X-Forwarded-For`.
    pub fn trust_proxy(mut self, net: IpNet) -> Self {
        self.trusted.push(net);
        self
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(ip))
    }

    /// The client address of an HTTP request.
    pub fn client_ip<B>(&self, req: &http::Request<B>) -> Option<IpAddr> {
        let peer = req.extensions().get::<PeerAddr>()?.0.ip();
        if !self.trusted(peer) {
            return Some(peer);
        }
        let mut hops = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        hops.reverse();
        for hop in hops {
            match hop.parse::<IpAddr>() {
                Ok(ip) if self.trusted(ip) => continue,
                Ok(ip) => return Some(ip),
                // A garbled hop: nothing to its left can be trusted either.
                Err(_) => return Some(peer),
            }
        }
        Some(peer)
    }
}

impl<B> KeyExtractor<http::Request<B>> for ClientIp {
    fn extract(&self, req: &http::Request<B>) -> Option<String> {
        self.client_ip(req).map(|ip| ip.to_string())
    }
}

impl<T> KeyExtractor<crate::Request<T>> for ClientIp {
    fn extract(&self, req: &crate::Request<T>) -> Option<String> {
        req.extensions()
            .get::<PeerAddr>()
            .map(|p| p.0.ip().to_string())
    }
}
