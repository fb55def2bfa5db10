//! Tests of signed session tokens: `TokenCodec` alone, property tests of its encoding,
//! and token mode through `AffinityLayer::token` over a round-robin `Balance` of
//! in-memory HTTP endpoints (the token in a `route` cookie, or a header).
//!
//! - **Codec**: round trip; forged tags, truncated, extended, empty, random, non-hex and
//!   non-ASCII input, another key's tokens, spliced body and tag, and expired tokens
//!   (the clock set with `with_clock`) all check to `None`, never a panic; only the
//!   canonical lowercase spelling checks (an upper- or mixed-case copy of a valid token
//!   is refused as forged); keys under 16 bytes are a `WeakKey`.
//! - **Properties**: encode then decode gives the token back for any endpoint and
//!   expiry; flipping any one bit of the encoded bytes (one bit of one hex digit's
//!   value) makes it invalid; upper-casing any of its letters makes it invalid;
//!   arbitrary strings never check.
//! - **Through the layer**: a new session's `IssuedToken` pins it; bad tokens are
//!   ignored (the request is served), counted in `rejected_tokens`, and replaced with a
//!   fresh `IssuedToken` (an upper-case copy of a valid token too, while the original
//!   keeps its pin); a token is refreshed once less than half its life is left; a
//!   token naming an endpoint that is gone is re-pinned (or, `strict`, fails with
//!   `PinnedEndpointUnavailable`); another instance holding the key honours it.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_affinity::{
    Affinity, AffinityHandle, AffinityLayer, IssuedToken, NewSession, TOKEN_LEN, Token, TokenCodec,
    WeakKey,
};
use marina_balance::{Balance, BalanceHandle, RoundRobin};
use marina_core::{BoxError, CookieKey, EndpointId, HeaderKey, PinnedEndpointUnavailable};
use proptest::prelude::*;
use tower::discover::ServiceList;
use tower::{Layer, Service, ServiceExt};

const KEY: &[u8] = b"thirty-two bytes of test secret!";
const TTL: Duration = Duration::from_secs(3600);
/// The test clock's start, in Unix seconds.
const T0: u64 = 1_700_000_000;

/// A codec whose clock reads `now`.
fn codec_at(now: &Arc<AtomicU64>) -> TokenCodec {
    let now = now.clone();
    TokenCodec::new(KEY, TTL)
        .unwrap()
        .with_clock(move || now.load(Ordering::Relaxed))
}

fn clock() -> Arc<AtomicU64> {
    Arc::new(AtomicU64::new(T0))
}

/// The value of hex digit `c`.
fn hex_value(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => panic!("not a lowercase hex digit: {c}"),
    }
}

/// `token` with bit `bit` (0..4) of the value of its hex digit at `pos` flipped.
fn flip(token: &str, pos: usize, bit: u32) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let v = hex_value(bytes[pos]) ^ (1 << bit);
    bytes[pos] = b"0123456789abcdef"[usize::from(v)];
    String::from_utf8(bytes).unwrap()
}

// ---------------------------------------------------------------------------------------
// The codec
// ---------------------------------------------------------------------------------------

#[test]
fn issued_tokens_check_out() {
    let now = clock();
    let codec = codec_at(&now);
    assert_eq!(codec.ttl(), TTL);
    let token = codec.issue(EndpointId(42));
    assert_eq!(token.len(), TOKEN_LEN);
    assert_eq!(TOKEN_LEN, 66);
    assert!(
        token
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    );
    let expected = Token {
        endpoint: EndpointId(42),
        expires: T0 + 3600,
    };
    assert_eq!(codec.check(&token), Some(expected));
    assert_eq!(codec.decode(&token), Some(expected));
    // Deterministic: the same contents, the same token.
    assert_eq!(codec.issue(EndpointId(42)), token);
    assert_ne!(codec.issue(EndpointId(43)), token);
    // A codec with the same key reads it (another instance, another process).
    let twin = codec_at(&now);
    assert_eq!(twin.check(&token), Some(expected));
}

#[test]
fn expired_tokens_do_not_check() {
    let now = clock();
    let codec = codec_at(&now);
    let token = codec.issue(EndpointId(1));
    now.store(T0 + 3599, Ordering::Relaxed);
    assert!(codec.check(&token).is_some(), "one second left");
    now.store(T0 + 3600, Ordering::Relaxed);
    assert_eq!(codec.check(&token), None, "expires at its expiry");
    assert_eq!(
        codec.decode(&token).map(|t| t.expires),
        Some(T0 + 3600),
        "authentic, though expired"
    );

    // Any expiry can be encoded; only future ones check.
    now.store(T0, Ordering::Relaxed);
    let at = |expires| {
        codec.encode(Token {
            endpoint: EndpointId(9),
            expires,
        })
    };
    assert_eq!(codec.check(&at(T0 - 1)), None);
    assert_eq!(codec.check(&at(T0)), None);
    assert!(codec.check(&at(T0 + 1)).is_some());
    assert_eq!(codec.check(&at(0)), None);
    assert!(codec.check(&at(u64::MAX)).is_some());
}

#[test]
fn forged_and_garbled_tokens_do_not_check() {
    let now = clock();
    let codec = codec_at(&now);
    let token = codec.issue(EndpointId(7));
    let other = codec.issue(EndpointId(8));
    let foreign = TokenCodec::new(b"another secret, also 32 bytes...", TTL)
        .unwrap()
        .with_clock(|| T0)
        .issue(EndpointId(7));

    let last = token.len() - 1;
    let mut bad: Vec<(&str, String)> = vec![
        ("tag's last digit changed", flip(&token, last, 0)),
        ("tag's first digit changed", flip(&token, 34, 3)),
        ("endpoint changed", flip(&token, 17, 0)),
        ("expiry changed", flip(&token, 33, 0)),
        ("version changed", flip(&token, 1, 1)),
        ("truncated by one", token[..last].to_string()),
        ("truncated by two", token[..last - 1].to_string()),
        ("the body alone", token[..34].to_string()),
        ("extended", format!("{token}00")),
        ("empty", String::new()),
        ("another key's", foreign),
        (
            "spliced: one body, another tag",
            format!("{}{}", &token[..34], &other[34..]),
        ),
        ("all zeros", "0".repeat(TOKEN_LEN)),
        ("all f", "f".repeat(TOKEN_LEN)),
        ("a non-hex digit", format!("g{}", &token[1..])),
        ("spaces", format!(" {} ", &token[1..last])),
        (
            "a two-byte character in place of two digits",
            format!("é{}", &token[2..]),
        ),
        ("random words", "the quick brown fox".to_string()),
    ];
    // Random hex of the right length (a fixed-seed generator).
    let mut rng = fastrand_like(0x5eed);
    for _ in 0..100 {
        let s: String = (0..TOKEN_LEN)
            .map(|_| char::from(b"0123456789abcdef"[(rng() % 16) as usize]))
            .collect();
        bad.push(("random hex", s));
    }
    for (what, t) in &bad {
        assert_eq!(codec.check(t), None, "{what}: {t:?}");
        assert_eq!(codec.decode(t), None, "{what}: {t:?}");
    }
    assert!(codec.check(&token).is_some(), "the original still checks");
}

/// A small xorshift generator (no dependency needed for 100 random strings).
fn fastrand_like(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// `token` with the letter digits at `positions` (indices into its letters) in upper
/// case.
fn upper_at(token: &str, positions: &[usize]) -> String {
    let letters: Vec<usize> = token
        .bytes()
        .enumerate()
        .filter(|(_, b)| b.is_ascii_alphabetic())
        .map(|(i, _)| i)
        .collect();
    let mut bytes = token.as_bytes().to_vec();
    for &p in positions {
        bytes[letters[p % letters.len()]].make_ascii_uppercase();
    }
    String::from_utf8(bytes).unwrap()
}

/// One spelling per token: the codec issues lowercase hex, and an upper- or mixed-case
/// copy, though it carries the same bytes, is refused like a forgery (so a deny list or
/// a cache keyed by the token string cannot be sidestepped by changing case).
#[test]
fn only_the_lowercase_spelling_checks() {
    let now = clock();
    let codec = codec_at(&now);
    // The endpoint's bytes alone hold the letters a to f.
    let token = codec.issue(EndpointId(0xABCDEF));
    assert!(token.contains("abcdef"), "{token}");
    let letters = token.bytes().filter(u8::is_ascii_alphabetic).count();
    let mut copies = vec![
        ("upper case", token.to_ascii_uppercase()),
        ("first letter upper", upper_at(&token, &[0])),
        ("last letter upper", upper_at(&token, &[letters - 1])),
        (
            "every other letter upper",
            upper_at(&token, &(0..letters).step_by(2).collect::<Vec<_>>()),
        ),
    ];
    // Each letter alone in upper case.
    for p in 0..letters {
        copies.push(("one letter upper", upper_at(&token, &[p])));
    }
    for (what, copy) in &copies {
        assert_ne!(copy, &token, "{what}");
        assert!(copy.eq_ignore_ascii_case(&token), "{what}: the same bytes");
        assert_eq!(codec.check(copy), None, "{what}: {copy}");
        assert_eq!(codec.decode(copy), None, "{what}: {copy}");
    }
    // The original, as issued, still checks.
    assert_eq!(
        codec.check(&token),
        Some(Token {
            endpoint: EndpointId(0xABCDEF),
            expires: T0 + 3600
        })
    );
}

#[test]
fn short_keys_are_weak() {
    for len in [0, 1, 8, 15] {
        let err = TokenCodec::new(&vec![7u8; len], TTL).unwrap_err();
        assert_eq!(err, WeakKey { len });
        assert!(err.to_string().contains(&format!("{len} bytes")), "{err}");
    }
    assert!(TokenCodec::new(&[7u8; 16], TTL).is_ok());
    assert!(TokenCodec::new(&[7u8; 100], TTL).is_ok());
}

#[test]
fn the_codec_does_not_print_its_key() {
    let codec = TokenCodec::new(KEY, TTL).unwrap();
    let printed = format!("{codec:?}");
    assert!(printed.contains("ttl"), "{printed}");
    assert!(!printed.contains("secret"), "{printed}");
}

proptest! {
    #[test]
    fn encode_decode_round_trips(endpoint: u64, expires: u64) {
        let codec = TokenCodec::new(KEY, TTL).unwrap();
        let token = Token { endpoint: EndpointId(endpoint), expires };
        let s = codec.encode(token);
        prop_assert_eq!(s.len(), TOKEN_LEN);
        prop_assert_eq!(codec.decode(&s), Some(token));
    }

    #[test]
    fn any_single_bit_flip_is_rejected(
        endpoint: u64,
        expires: u64,
        pos in 0..TOKEN_LEN,
        bit in 0..4u32,
    ) {
        let codec = TokenCodec::new(KEY, TTL).unwrap().with_clock(|| 0);
        let token = codec.encode(Token { endpoint: EndpointId(endpoint), expires });
        let flipped = flip(&token, pos, bit);
        prop_assert_ne!(&flipped, &token);
        prop_assert_eq!(codec.decode(&flipped), None);
        prop_assert_eq!(codec.check(&flipped), None);
    }

    #[test]
    fn any_upper_case_letter_is_rejected(
        endpoint: u64,
        expires: u64,
        positions in proptest::collection::vec(0..TOKEN_LEN, 1..8),
    ) {
        let codec = TokenCodec::new(KEY, TTL).unwrap().with_clock(|| 0);
        let original = Token { endpoint: EndpointId(endpoint), expires };
        let token = codec.encode(original);
        // A 66-digit hex token of random-looking tag bytes has letters, bar a fluke.
        prop_assume!(token.bytes().any(|b| b.is_ascii_alphabetic()));
        let copy = upper_at(&token, &positions);
        prop_assert_ne!(&copy, &token);
        prop_assert_eq!(codec.decode(&copy), None);
        prop_assert_eq!(codec.decode(&token), Some(original));
    }

    #[test]
    fn arbitrary_strings_do_not_check(s in ".{0,80}", hex in "[0-9a-f]{66}") {
        let codec = TokenCodec::new(KEY, TTL).unwrap().with_clock(|| 0);
        prop_assert_eq!(codec.check(&s), None);
        prop_assert_eq!(codec.decode(&hex), None);
    }
}

// ---------------------------------------------------------------------------------------
// Through the layer
// ---------------------------------------------------------------------------------------

type HttpReq = http::Request<()>;
type HttpResp = http::Response<usize>;

/// An in-memory HTTP endpoint answering with its index.
#[derive(Debug, Clone, Copy)]
struct Backend(usize);

impl Service<HttpReq> for Backend {
    type Response = HttpResp;
    type Error = Infallible;
    type Future = Ready<Result<HttpResp, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: HttpReq) -> Self::Future {
        ready(Ok(http::Response::new(self.0)))
    }
}

type Lb = Balance<ServiceList<Vec<Backend>>, HttpReq>;

fn balance() -> (Lb, BalanceHandle) {
    let lb = Balance::from_services((0..3).map(Backend), RoundRobin::new())
        .route_hints_from_extensions();
    let h = lb.handle();
    (lb, h)
}

/// Token mode reading the `route` cookie.
fn cookie_stack(
    codec: TokenCodec,
    new_sessions: bool,
) -> (Affinity<Lb, CookieKey>, AffinityHandle, BalanceHandle) {
    let (lb, lb_handle) = balance();
    let layer = AffinityLayer::token(CookieKey::new("route"), codec).new_sessions(new_sessions);
    let handle = layer.handle();
    (layer.layer(lb), handle, lb_handle)
}

/// Sends a request with `route=<token>` in its cookie (none: no cookie).
async fn send<S>(svc: &mut S, token: Option<&str>) -> Result<HttpResp, BoxError>
where
    S: Service<HttpReq, Response = HttpResp, Error = BoxError>,
{
    let mut req = http::Request::builder();
    if let Some(t) = token {
        req = req.header("cookie", format!("theme=dark; route={t}"));
    }
    svc.ready().await?.call(req.body(()).unwrap()).await
}

fn issued(resp: &HttpResp) -> Option<String> {
    resp.extensions().get::<IssuedToken>().map(|t| t.0.clone())
}

/// The endpoint id at each balancer position.
fn id_of(lb: &BalanceHandle, position: usize) -> EndpointId {
    lb.stats()
        .into_iter()
        .find(|s| s.key == position.to_string())
        .expect("a known endpoint")
        .id
}

#[tokio::test]
async fn no_token_and_no_new_sessions_creates_nothing() {
    let now = clock();
    let (mut svc, handle, _) = cookie_stack(codec_at(&now), false);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let resp = send(&mut svc, None).await.unwrap();
        assert_eq!(issued(&resp), None);
        seen.insert(*resp.body());
    }
    assert_eq!(seen.len(), 3, "round robin as usual");
    let stats = handle.stats();
    assert_eq!((stats.created, stats.rejected_tokens), (0, 0));
}

#[tokio::test]
async fn a_new_session_token_pins_it() {
    let now = clock();
    let codec = codec_at(&now);
    let (mut svc, handle, lb) = cookie_stack(codec.clone(), true);

    let resp = send(&mut svc, None).await.unwrap();
    let backend = *resp.body();
    let token = issued(&resp).expect("a token for the new session");
    assert!(
        resp.extensions().get::<NewSession>().is_none(),
        "in token mode the token is the session"
    );
    assert_eq!(
        codec.check(&token),
        Some(Token {
            endpoint: id_of(&lb, backend),
            expires: T0 + 3600
        })
    );
    for _ in 0..5 {
        let again = send(&mut svc, Some(&token)).await.unwrap();
        assert_eq!(*again.body(), backend);
        assert_eq!(issued(&again), None, "still fresh: no new token");
    }
    let stats = handle.stats();
    assert_eq!(
        (stats.created, stats.rejected_tokens, stats.repinned),
        (1, 0, 0)
    );
    assert_eq!(stats.sessions, 0, "no state kept");
    assert!(handle.sessions(10).is_empty());
}

#[tokio::test]
async fn bad_tokens_are_ignored_counted_and_replaced() {
    let now = clock();
    let codec = codec_at(&now);
    let token = codec.issue(EndpointId(1));
    let foreign = TokenCodec::new(b"another secret, also 32 bytes...", TTL)
        .unwrap()
        .issue(EndpointId(1));
    let bad = [
        flip(&token, TOKEN_LEN - 1, 2),
        token[..TOKEN_LEN - 2].to_string(),
        "0".repeat(TOKEN_LEN),
        "not-a-token".to_string(),
        token.replace(|c: char| c.is_ascii_digit(), "z"),
        foreign,
        "\"quoted-garbage\"".to_string(),
    ];
    // Without `new_sessions`: a client that sent a token is given a valid one.
    let (mut svc, handle, lb) = cookie_stack(codec.clone(), false);
    for (n, t) in bad.iter().enumerate() {
        let resp = send(&mut svc, Some(t)).await.expect("served all the same");
        let fresh = issued(&resp).unwrap_or_else(|| panic!("no new token for {t:?}"));
        let checked = codec.check(&fresh).expect("a valid replacement");
        assert_eq!(checked.endpoint, id_of(&lb, *resp.body()));
        assert_eq!(handle.stats().rejected_tokens, n as u64 + 1);
        // The replacement sticks.
        let again = send(&mut svc, Some(&fresh)).await.unwrap();
        assert_eq!(*again.body(), *resp.body());
        assert_eq!(issued(&again), None);
    }
    let stats = handle.stats();
    assert_eq!(stats.rejected_tokens, bad.len() as u64);
    assert_eq!(stats.created, bad.len() as u64);

    // An empty cookie is no token at all: nothing rejected, nothing issued.
    let resp = send(&mut svc, Some("")).await.unwrap();
    assert_eq!(issued(&resp), None);
    assert_eq!(handle.stats().rejected_tokens, bad.len() as u64);
}

#[tokio::test]
async fn a_token_in_another_letter_case_is_ignored_and_the_original_keeps_its_pin() {
    let now = clock();
    let codec = codec_at(&now);
    let (mut svc, handle, lb) = cookie_stack(codec.clone(), true);
    let resp = send(&mut svc, None).await.unwrap();
    let backend = *resp.body();
    let token = issued(&resp).unwrap();
    let copies = [
        token.to_ascii_uppercase(),
        upper_at(&token, &[0]),
        upper_at(&token, &[1, 3, 5]),
    ];
    for (n, copy) in copies.iter().enumerate() {
        assert_ne!(copy, &token);
        let resp = send(&mut svc, Some(copy))
            .await
            .expect("served all the same");
        let fresh = issued(&resp).unwrap_or_else(|| panic!("{copy} honoured as a token"));
        assert_ne!(&fresh, copy);
        assert_eq!(
            codec.check(&fresh).map(|t| t.endpoint),
            Some(id_of(&lb, *resp.body()))
        );
        assert_eq!(handle.stats().rejected_tokens, n as u64 + 1);
    }
    // The original, as issued, still pins its session.
    for _ in 0..3 {
        let again = send(&mut svc, Some(&token)).await.unwrap();
        assert_eq!((*again.body(), issued(&again)), (backend, None));
    }
    assert_eq!(handle.stats().rejected_tokens, copies.len() as u64);
}

#[tokio::test]
async fn expired_tokens_are_replaced() {
    let now = clock();
    let codec = codec_at(&now);
    let (mut svc, handle, lb) = cookie_stack(codec.clone(), true);
    let resp = send(&mut svc, None).await.unwrap();
    let token = issued(&resp).unwrap();

    now.store(T0 + 3600, Ordering::Relaxed);
    let resp = send(&mut svc, Some(&token)).await.unwrap();
    let fresh = issued(&resp).expect("a replacement");
    assert_eq!(
        codec.check(&fresh),
        Some(Token {
            endpoint: id_of(&lb, *resp.body()),
            expires: T0 + 7200
        })
    );
    let stats = handle.stats();
    assert_eq!((stats.rejected_tokens, stats.created), (1, 2));
}

#[tokio::test]
async fn tokens_are_refreshed_past_half_their_life() {
    let now = clock();
    let codec = codec_at(&now);
    let (mut svc, handle, lb) = cookie_stack(codec.clone(), true);
    let resp = send(&mut svc, None).await.unwrap();
    let backend = *resp.body();
    let token = issued(&resp).unwrap();

    // 1800 s left: not yet.
    now.store(T0 + 1800, Ordering::Relaxed);
    let resp = send(&mut svc, Some(&token)).await.unwrap();
    assert_eq!((*resp.body(), issued(&resp)), (backend, None));

    // 1799 s left: less than half the ttl, refreshed, same endpoint.
    now.store(T0 + 1801, Ordering::Relaxed);
    let resp = send(&mut svc, Some(&token)).await.unwrap();
    assert_eq!(*resp.body(), backend);
    let refreshed = issued(&resp).expect("a refreshed token");
    assert_eq!(
        codec.check(&refreshed),
        Some(Token {
            endpoint: id_of(&lb, backend),
            expires: T0 + 1801 + 3600
        })
    );
    // The refreshed one is fresh again; the old one still works until it expires.
    let resp = send(&mut svc, Some(&refreshed)).await.unwrap();
    assert_eq!((*resp.body(), issued(&resp)), (backend, None));
    let stats = handle.stats();
    assert_eq!(
        (stats.created, stats.repinned, stats.rejected_tokens),
        (1, 0, 0)
    );
}

#[tokio::test]
async fn a_token_for_a_gone_endpoint_is_repinned() {
    let now = clock();
    let codec = codec_at(&now);
    let (mut svc, handle, lb) = cookie_stack(codec.clone(), false);
    let stale = codec.issue(EndpointId(12345));

    let resp = send(&mut svc, Some(&stale)).await.unwrap();
    let fresh = issued(&resp).expect("a token for the new endpoint");
    assert_eq!(
        codec.check(&fresh).map(|t| t.endpoint),
        Some(id_of(&lb, *resp.body()))
    );
    let stats = handle.stats();
    assert_eq!(
        (stats.repinned, stats.rejected_tokens, stats.created),
        (1, 0, 0)
    );
    for _ in 0..3 {
        let again = send(&mut svc, Some(&fresh)).await.unwrap();
        assert_eq!(*again.body(), *resp.body());
    }

    // Strict: the request fails instead, naming the endpoint.
    let (lb2, _) = balance();
    let mut strict = AffinityLayer::token(CookieKey::new("route"), codec.clone())
        .strict(true)
        .layer(lb2);
    let err = send(&mut strict, Some(&stale)).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<PinnedEndpointUnavailable>(),
        Some(&PinnedEndpointUnavailable {
            endpoint: EndpointId(12345)
        })
    );
}

#[tokio::test]
async fn another_instance_honours_the_token() {
    let now = clock();
    // Instance A reads a cookie, instance B a header; both hold the key.
    let (mut a, _, _) = cookie_stack(codec_at(&now), true);
    let (lb_b, _) = balance();
    let b_layer = AffinityLayer::token(HeaderKey::new("x-route"), codec_at(&now));
    let b_handle = b_layer.handle();
    let mut b = b_layer.layer(lb_b);

    for _ in 0..10 {
        let resp = send(&mut a, None).await.unwrap();
        let token = issued(&resp).unwrap();
        for _ in 0..3 {
            let req = http::Request::builder()
                .header("x-route", &token)
                .body(())
                .unwrap();
            let from_b = b.ready().await.unwrap().call(req).await.unwrap();
            assert_eq!(*from_b.body(), *resp.body());
            assert_eq!(issued(&from_b), None);
        }
    }
    let stats = b_handle.stats();
    assert_eq!(
        (stats.created, stats.rejected_tokens, stats.repinned),
        (0, 0, 0)
    );
}
