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
///
/// # Borrowed keys
///
/// [`with_key`](Self::with_key) lends the key to a closure instead of returning it, so
/// a limiter can look a known key up without allocating: [`HeaderKey`] and
/// [`CookieKey`] lend a slice of the header, [`ClientIp`] formats the address on the
/// stack. A closure extractor returns an owned `String`, and `with_key` lends that. An
/// extractor of your own that can borrow its key implements both:
///
/// ```
/// use marina_core::KeyExtractor;
///
/// struct Order { user: &'static str, item: u32 }
///
/// struct ByUser;
///
/// impl KeyExtractor<Order> for ByUser {
///     fn extract(&self, req: &Order) -> Option<String> {
///         self.with_key(req, str::to_owned)
///     }
///
///     fn with_key<R, F: FnOnce(&str) -> R>(&self, req: &Order, f: F) -> Option<R> {
///         Some(f(req.user))
///     }
/// }
///
/// let order = Order { user: "alice", item: 7 };
/// assert_eq!(ByUser.with_key(&order, str::len), Some(5));
/// assert_eq!(ByUser.extract(&order).as_deref(), Some("alice"));
/// ```
pub trait KeyExtractor<Req>: Send + Sync + 'static {
    /// The request's key, if it has one.
    fn extract(&self, req: &Req) -> Option<String>;

    /// Calls `f` with the request's key and returns what it returns; `None`, without
    /// calling `f`, when the request has none. The key is the one
    /// [`extract`](Self::extract) returns (`with_key(req, str::to_owned)` equals
    /// `extract(req)`), lent rather than given: borrowed from the request, or made on
    /// the stack, where the extractor can.
    ///
    /// The provided implementation lends the `String` that `extract` returns (one
    /// allocation); [`HeaderKey`], [`CookieKey`] and [`ClientIp`] allocate nothing.
    fn with_key<R, F>(&self, req: &Req, f: F) -> Option<R>
    where
        Self: Sized,
        F: FnOnce(&str) -> R,
    {
        self.extract(req).map(|key| f(&key))
    }
}

/// The longest key the extractors return, in bytes.
pub const MAX_KEY_LEN: usize = 512;

/// `s`, if it is a key: not empty and at most [`MAX_KEY_LEN`] bytes.
fn bounded(s: &str) -> Option<&str> {
    (!s.is_empty() && s.len() <= MAX_KEY_LEN).then_some(s)
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

impl HeaderKey {
    fn value<'r, B>(&self, req: &'r http::Request<B>) -> Option<&'r str> {
        bounded(req.headers().get(&self.name)?.to_str().ok()?.trim())
    }
}

impl<B> KeyExtractor<http::Request<B>> for HeaderKey {
    fn extract(&self, req: &http::Request<B>) -> Option<String> {
        self.value(req).map(str::to_owned)
    }

    fn with_key<R, F: FnOnce(&str) -> R>(&self, req: &http::Request<B>, f: F) -> Option<R> {
        self.value(req).map(f)
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

impl CookieKey {
    fn value<'r, B>(&self, req: &'r http::Request<B>) -> Option<&'r str> {
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

impl<B> KeyExtractor<http::Request<B>> for CookieKey {
    fn extract(&self, req: &http::Request<B>) -> Option<String> {
        self.value(req).map(str::to_owned)
    }

    fn with_key<R, F: FnOnce(&str) -> R>(&self, req: &http::Request<B>, f: F) -> Option<R> {
        self.value(req).map(f)
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
        // An IPv4-mapped network (`::ffff:10.0.0.0/104`, as a dual-stack socket reports
        // its peers) is the IPv4 network it maps: `contains` compares mapped addresses
        // as IPv4.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
            && prefix >= 96
        {
            return Ok(IpNet {
                addr: IpAddr::V4(v4),
                prefix: prefix - 96,
            });
        }
        Ok(IpNet { addr, prefix })
    }
}

impl IpNet {
    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as IPv4).
    ///
    /// An IPv6 network wider than the mapped block (`::/0`, `::ffff:0.0.0.0/80`) holds
    /// the IPv4 addresses it maps as well.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match self.addr {
            IpAddr::V4(net) => {
                let ip = match ip {
                    IpAddr::V4(v4) => v4,
                    IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                        Some(v4) => v4,
                        None => return false,
                    },
                };
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            IpAddr::V6(net) => {
                let ip = match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
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
        // Right to left: the last header first, each one's last hop first. A hop that
        // is not an address (or a header line that is not text) is garbled: nothing to
        // its left can be trusted either.
        for value in req.headers().get_all("x-forwarded-for").iter().rev() {
            let Ok(value) = value.to_str() else {
                return Some(peer);
            };
            for hop in value.rsplit(',').map(str::trim) {
                match hop.parse::<IpAddr>() {
                    Ok(ip) if self.trusted(ip) => continue,
                    Ok(ip) => return Some(ip),
                    Err(_) => return Some(peer),
                }
            }
        }
        Some(peer)
    }
}

impl<B> KeyExtractor<http::Request<B>> for ClientIp {
    fn extract(&self, req: &http::Request<B>) -> Option<String> {
        self.client_ip(req).map(|ip| ip.to_string())
    }

    fn with_key<R, F: FnOnce(&str) -> R>(&self, req: &http::Request<B>, f: F) -> Option<R> {
        self.client_ip(req).map(|ip| IpText::new(ip).with(f))
    }
}

impl<T> KeyExtractor<crate::Request<T>> for ClientIp {
    fn extract(&self, req: &crate::Request<T>) -> Option<String> {
        req.extensions()
            .get::<PeerAddr>()
            .map(|p| p.0.ip().to_string())
    }

    fn with_key<R, F: FnOnce(&str) -> R>(&self, req: &crate::Request<T>, f: F) -> Option<R> {
        let ip = req.extensions().get::<PeerAddr>()?.0.ip();
        Some(IpText::new(ip).with(f))
    }
}

/// An address's text (as its `Display` writes it) on the stack: the longest, an IPv6
/// address of eight full groups, is 39 bytes.
struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> Self {
        use std::fmt::Write as _;
        let mut text = IpText {
            buf: [0; 48],
            len: 0,
        };
        // Cannot fail: the text fits.
        let _ = write!(text, "{ip}");
        text
    }

    /// Lends the text to `f`.
    fn with<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        // Whole `&str`s were copied in: valid UTF-8.
        f(std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default())
    }
}

impl fmt::Write for IpText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)], peer: Option<&str>) -> http::Request<()> {
        let mut req = http::Request::builder();
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let mut req = req.body(()).unwrap();
        if let Some(peer) = peer {
            req.extensions_mut().insert(PeerAddr(peer.parse().unwrap()));
        }
        req
    }

    /// `with_key` lends exactly the key `extract` returns, for every request.
    fn agree<Req, X: KeyExtractor<Req>>(x: &X, req: &Req) -> Option<String> {
        let lent = x.with_key(req, str::to_owned);
        assert_eq!(lent, x.extract(req));
        lent
    }

    #[test]
    fn header_and_cookie_keys_lend_what_they_extract() {
        let longest = "k".repeat(MAX_KEY_LEN);
        let too_long = "k".repeat(MAX_KEY_LEN + 1);
        let header = HeaderKey::new("x-user");
        let cookie = CookieKey::new("SESSION");
        let cases: Vec<Vec<(&str, String)>> = vec![
            vec![],
            vec![("x-user", "alice".into())],
            vec![("x-user", "  alice \t".into())],
            vec![("x-user", "".into())],
            vec![("x-user", "   ".into())],
            vec![("x-user", "one".into()), ("x-user", "two".into())],
            vec![("x-user", longest.clone())],
            vec![("x-user", too_long.clone())],
            vec![("cookie", "theme=dark; SESSION=abc123".into())],
            vec![("cookie", "SESSION=\"quoted\"".into())],
            vec![("cookie", "a=1".into()), ("cookie", " SESSION = x ".into())],
            vec![("cookie", "SESSION=".into())],
            vec![("cookie", format!("SESSION={longest}"))],
            vec![("cookie", format!("SESSION={too_long}"))],
            vec![("set-cookie", "SESSION=abc".into())],
        ];
        let mut found = 0;
        for case in &cases {
            let headers: Vec<(&str, &str)> = case.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let req = request(&headers, None);
            found += agree(&header, &req).is_some() as u32;
            found += agree(&cookie, &req).is_some() as u32;
        }
        // alice (twice), one, the longest; abc123, quoted, x, the longest.
        assert_eq!(found, 8);
        let req = request(&[("x-user", "  alice ")], None);
        assert_eq!(header.with_key(&req, |k| k.as_ptr()), {
            let value = req.headers()["x-user"].to_str().unwrap();
            Some(value[2..].as_ptr())
        });
    }

    #[test]
    fn client_ip_lends_what_it_extracts() {
        let ip = ClientIp::new().trust_proxy("10.0.0.0/8".parse().unwrap());
        let peers = [
            None,
            Some("198.51.100.7:1"),
            Some("10.0.0.1:1"),
            Some("[2001:db8::1]:1"),
            Some("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:1"),
            Some("[::ffff:10.0.0.1]:1"),
        ];
        let xffs: [&[&str]; 6] = [
            &[],
            &["203.0.113.9"],
            &["6.6.6.6, 203.0.113.9, 10.0.0.7"],
            &["6.6.6.6", "203.0.113.9, 10.0.0.7", "10.0.0.8"],
            &["garbage, 10.0.0.7"],
            &["1111:2222:3333:4444:5555:6666:7777:8888"],
        ];
        for peer in peers {
            for xff in xffs {
                let headers: Vec<(&str, &str)> =
                    xff.iter().map(|v| ("x-forwarded-for", *v)).collect();
                let req = request(&headers, peer);
                let key = agree(&ip, &req);
                assert_eq!(key.is_some(), peer.is_some());
                let mut raw = crate::Request::new(());
                if let Some(peer) = peer {
                    raw.extensions_mut().insert(PeerAddr(peer.parse().unwrap()));
                }
                agree(&ip, &raw);
            }
        }
        let req = request(
            &["6.6.6.6", "203.0.113.9, 10.0.0.7", "10.0.0.8"].map(|v| ("x-forwarded-for", v)),
            Some("10.0.0.1:1"),
        );
        assert_eq!(
            ip.with_key(&req, str::to_owned).as_deref(),
            Some("203.0.113.9")
        );
    }

    #[test]
    fn closures_lend_their_owned_key() {
        let by_path = |r: &http::Request<()>| Some(r.uri().path().to_string());
        let req = http::Request::builder().uri("/users/42").body(()).unwrap();
        assert_eq!(agree(&by_path, &req).as_deref(), Some("/users/42"));
        let too_long = |_: &http::Request<()>| Some("k".repeat(MAX_KEY_LEN + 1));
        assert_eq!(agree(&too_long, &req), None);
    }

    /// Found by the `keys` fuzz target: a header line that is not text (legal in HTTP)
    /// was skipped, so an address the client forged further left was believed.
    #[test]
    fn a_header_line_that_is_not_text_ends_the_trusted_chain() {
        let ip = ClientIp::new().trust_proxy("10.0.0.0/8".parse().unwrap());
        let mut req = request(&[("x-forwarded-for", "6.6.6.6")], Some("10.0.0.1:1"));
        req.headers_mut().append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\xff, 203.0.113.9").unwrap(),
        );
        assert_eq!(ip.client_ip(&req), Some("10.0.0.1".parse().unwrap()));
        // The same hops as text: the proxy's report is believed, nothing left of it.
        let req = request(
            &[
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-for", "7.7.7.7, 203.0.113.9"),
            ],
            Some("10.0.0.1:1"),
        );
        assert_eq!(ip.client_ip(&req), Some("203.0.113.9".parse().unwrap()));
    }

    /// Found by the `keys` fuzz target: an IPv4-mapped network matched nothing, not
    /// even its own address.
    #[test]
    fn an_ipv4_mapped_network_is_its_ipv4_network() {
        let net: IpNet = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(net, "10.0.0.0/8".parse().unwrap());
        assert!(net.contains("::ffff:10.0.0.0".parse().unwrap()));
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let one: IpNet = "::ffff:192.0.2.7".parse().unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        // A prefix shorter than the mapped block stays an IPv6 network, and holds the
        // IPv4 addresses it maps (found by the fuzzer too: `::ffff:10.0.0.0/14`).
        let wide: IpNet = "::ffff:0.0.0.0/80".parse().unwrap();
        assert!(wide.contains("::1".parse().unwrap()));
        assert!(wide.contains("10.0.0.1".parse().unwrap()));
        let wider: IpNet = "::ffff:10.0.0.0/14".parse().unwrap();
        assert!(wider.contains("::ffff:10.0.0.0".parse().unwrap()));
        assert!(wider.contains("10.0.0.0".parse().unwrap()));
        assert!(
            !"2001:db8::/32"
                .parse::<IpNet>()
                .unwrap()
                .contains("10.0.0.1".parse().unwrap())
        );
    }
}
