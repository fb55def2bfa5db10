//! Signed session tokens: `{endpoint, expiry}` with an HMAC-SHA256 tag.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use marina_core::EndpointId;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Token format version.
const VERSION: u8 = 1;
/// Bytes: version, endpoint id, expiry (Unix seconds), then the tag.
const BODY: usize = 1 + 8 + 8;
/// The HMAC-SHA256 tag, truncated to 128 bits.
const TAG: usize = 16;
/// A token's length in (lowercase) hex characters.
pub const TOKEN_LEN: usize = (BODY + TAG) * 2;

/// Reads the wall clock in Unix seconds (injectable for tests).
pub(crate) type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

fn system_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Encodes and checks session tokens: the client carries `{endpoint, expiry}` with an
/// HMAC-SHA256 tag (truncated to 128 bits) under a key only the servers know, as 66
/// hex characters. A token that is forged, expired, truncated or garbled decodes to
/// nothing (never a panic); the affinity layer then picks afresh and issues a new one.
/// No server-side state: every instance holding the key reads every token.
///
/// # One spelling per token
///
/// Tokens are issued in lowercase hex, and only that spelling checks: a copy with any
/// upper-case letter (`A`–`F`) is refused like a forged token, though it carries the
/// same bytes. So each token has exactly one string form, and whatever is keyed by the
/// string (a deny list of revoked tokens, log search, a cache) agrees with the codec:
/// a token denied in lowercase cannot come back in upper or mixed case.
///
/// ```
/// use marina_affinity::TokenCodec;
/// use marina_core::EndpointId;
/// use std::time::Duration;
///
/// let codec = TokenCodec::new(b"a secret of at least 16 bytes!!", Duration::from_secs(3600)).unwrap();
/// let token = codec.issue(EndpointId(42));
/// assert_eq!(codec.check(&token).map(|t| t.endpoint), Some(EndpointId(42)));
/// let mut forged = token.clone();
/// forged.replace_range(0..2, "ff");
/// assert_eq!(codec.check(&forged), None);
/// assert_eq!(codec.check("garbage"), None);
/// // Only the lowercase spelling, the one issued, is honoured.
/// assert_eq!(codec.check(&token.to_ascii_uppercase()), None);
/// ```
#[derive(Clone)]
pub struct TokenCodec {
    mac: HmacSha256,
    ttl: Duration,
    clock: Clock,
}

impl fmt::Debug for TokenCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCodec")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A key too short to sign with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeakKey {
    /// The key's length in bytes.
    pub len: usize,
}

impl fmt::Display for WeakKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "token key of {} bytes is too short (at least 16 bytes of secret, 32 recommended)",
            self.len
        )
    }
}

impl std::error::Error for WeakKey {}

/// A checked token's contents. Its string form is [`TokenCodec::encode`]'s lowercase
/// hex, the only spelling [`TokenCodec::check`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// The endpoint the session is pinned to.
    pub endpoint: EndpointId,
    /// When it expires, in Unix seconds.
    pub expires: u64,
}

impl TokenCodec {
    /// Signs with `key` (at least 16 bytes); tokens live for `ttl`.
    pub fn new(key: &[u8], ttl: Duration) -> Result<Self, WeakKey> {
        if key.len() < 16 {
            return Err(WeakKey { len: key.len() });
        }
        let mac = HmacSha256::new_from_slice(key).map_err(|_| WeakKey { len: key.len() })?;
        Ok(TokenCodec {
            mac,
            ttl,
            clock: Arc::new(system_clock),
        })
    }

    /// Reads the time from `clock` (Unix seconds) instead of the system clock.
    pub fn with_clock(mut self, clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How long tokens live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn tag(&self, body: &[u8]) -> [u8; TAG] {
        let mut mac = self.mac.clone();
        mac.update(body);
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG];
        tag.copy_from_slice(&full[..TAG]);
        tag
    }

    /// A token pinning a session to `endpoint` until now + ttl.
    pub fn issue(&self, endpoint: EndpointId) -> String {
        let expires = (self.clock)().saturating_add(self.ttl.as_secs());
        self.encode(Token { endpoint, expires })
    }

    /// Encodes `token` (with any expiry).
    pub fn encode(&self, token: Token) -> String {
        let mut bytes = [0u8; BODY + TAG];
        bytes[0] = VERSION;
        bytes[1..9].copy_from_slice(&token.endpoint.0.to_be_bytes());
        bytes[9..17].copy_from_slice(&token.expires.to_be_bytes());
        let tag = self.tag(&bytes[..BODY]);
        bytes[BODY..].copy_from_slice(&tag);
        hex(&bytes)
    }

    /// The token's contents if it is authentic and not expired. Authentic means in the
    /// canonical spelling too: lowercase hex only (see [`TokenCodec`]).
    pub fn check(&self, token: &str) -> Option<Token> {
        let t = self.decode(token)?;
        (t.expires > (self.clock)()).then_some(t)
    }

    /// The token's contents if it is authentic (expired or not), in the canonical
    /// lowercase spelling.
    pub fn decode(&self, token: &str) -> Option<Token> {
        if token.len() != TOKEN_LEN {
            return None;
        }
        let mut bytes = [0u8; BODY + TAG];
        unhex(token, &mut bytes)?;
        if bytes[0] != VERSION {
            return None;
        }
        let mut mac = self.mac.clone();
        mac.update(&bytes[..BODY]);
        // Constant-time comparison of the truncated tag.
        mac.verify_truncated_left(&bytes[BODY..]).ok()?;
        let endpoint = u64::from_be_bytes(bytes[1..9].try_into().ok()?);
        let expires = u64::from_be_bytes(bytes[9..17].try_into().ok()?);
        Some(Token {
            endpoint: EndpointId(endpoint),
            expires,
        })
    }

    /// Now, by the codec's clock (Unix seconds).
    pub(crate) fn now(&self) -> u64 {
        (self.clock)()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// Reads lowercase hex only: the spelling `hex` writes, the one canonical form of a
/// token (an upper-case digit is an error, so no token has two spellings).
fn unhex(s: &str, out: &mut [u8]) -> Option<()> {
    let s = s.as_bytes();
    if s.len() != out.len() * 2 {
        return None;
    }
    let val = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for (i, o) in out.iter_mut().enumerate() {
        *o = (val(s[2 * i])? << 4) | val(s[2 * i + 1])?;
    }
    Some(())
}
