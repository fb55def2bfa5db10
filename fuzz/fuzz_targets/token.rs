//! marina-affinity's `TokenCodec`: `check` / `decode` on arbitrary strings.
//!
//! Input: the first line is a candidate token (read as UTF-8, lossily); the bytes after
//! it drive the structured checks (an endpoint, an expiry, a clock, a ttl, a key, a
//! mutation), read with `arbitrary` (missing bytes read as zeros).
//!
//! Invariants:
//! - `check` and `decode` never panic, whatever the string;
//! - one spelling per token (the `TokenCodec` docs): a string that `decode` accepts is
//!   exactly what `encode` writes for the decoded token, so it is 66 lowercase hex
//!   characters, and nothing the codec did not (or would not) sign is accepted;
//! - `check(s)` is `decode(s)` while the token is unexpired by the codec's clock
//!   (`expires > now`), `None` after;
//! - a token encoded with key A is accepted by A (decoding to what was encoded) and
//!   refused by a codec with any other key (B), also in upper case, also with any one
//!   character changed;
//! - `issue` pins to the endpoint until `now + ttl` (saturating);
//! - `new` refuses keys shorter than 16 bytes, and only those.
#![no_main]

use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use marina::affinity::{TOKEN_LEN, Token, TokenCodec};
use marina::core::EndpointId;

/// The fixed key the checked-in seeds were issued with.
const KEY_A: &[u8] = b"marina fuzz key A: 32 bytes long";
/// Another key: must never accept key A's tokens.
const KEY_B: &[u8] = b"marina fuzz key B: 32 bytes long";
/// The fixed clock of the seeds (Unix seconds): 2023-11-14T22:13:20Z.
const NOW: u64 = 1_700_000_000;

#[derive(Debug, Arbitrary)]
struct Plan {
    endpoint: u64,
    expires: u64,
    now: u64,
    ttl_secs: u64,
    /// A key of the fuzzer's (16 bytes and up are keys; shorter ones are weak).
    key: Vec<u8>,
    /// Which character of an encoded token to change, and to what.
    at: u8,
    to: u8,
}

/// Whether HMAC treats two keys as the same: keys up to the block size (64 bytes) are
/// padded with zeros, so `k` and `k\0` sign alike. Longer keys are hashed first; those
/// are compared as given (equal hashes of different keys are not a thing to expect).
fn same_hmac_key(a: &[u8], b: &[u8]) -> bool {
    if a.len() <= 64 && b.len() <= 64 {
        let trim = |k: &[u8]| k.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
        a[..trim(a)] == b[..trim(b)]
    } else {
        a == b
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// The contract of `decode` and `check` for one codec and any string.
fn check_string(codec: &TokenCodec, now: u64, s: &str) -> Option<Token> {
    let decoded = codec.decode(s);
    if let Some(t) = decoded {
        assert_eq!(
            s.len(),
            TOKEN_LEN,
            "accepted a token of another length: {s:?}"
        );
        assert!(
            is_lower_hex(s),
            "accepted a token not in lowercase hex: {s:?}"
        );
        assert_eq!(
            codec.encode(t),
            s,
            "accepted a string the codec would not write"
        );
    }
    let checked = codec.check(s);
    assert_eq!(
        checked,
        decoded.filter(|t| t.expires > now),
        "check vs decode at {now}: {s:?}"
    );
    decoded
}

fuzz_target!(|data: &[u8]| {
    let (line, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let candidate = String::from_utf8_lossy(line);
    let ttl = Duration::from_secs(3600);
    let a = TokenCodec::new(KEY_A, ttl).unwrap().with_clock(|| NOW);
    let b = TokenCodec::new(KEY_B, ttl).unwrap().with_clock(|| NOW);

    // Any string, both codecs: never a panic, never a second spelling, never both.
    let by_a = check_string(&a, NOW, &candidate);
    let by_b = check_string(&b, NOW, &candidate);
    assert!(
        by_a.is_none() || by_b.is_none(),
        "two keys accept one token: {candidate:?}"
    );
    // Also with its surrounding whitespace, as a header value might carry it.
    let trimmed = candidate.trim();
    if trimmed != candidate {
        check_string(&a, NOW, trimmed);
    }

    let mut u = Unstructured::new(rest);
    let Ok(plan) = Plan::arbitrary(&mut u) else {
        return;
    };

    // Encoded with A: A reads it back, B never; nor any other spelling or one-char edit.
    let token = Token {
        endpoint: EndpointId(plan.endpoint),
        expires: plan.expires,
    };
    let clocked = a.clone().with_clock(move || plan.now);
    let s = clocked.encode(token);
    assert_eq!(s.len(), TOKEN_LEN);
    assert!(is_lower_hex(&s));
    assert_eq!(check_string(&clocked, plan.now, &s), Some(token));
    assert_eq!(b.decode(&s), None, "key B accepts key A's token {s}");
    let upper = s.to_ascii_uppercase();
    if upper != s {
        assert_eq!(
            clocked.decode(&upper),
            None,
            "an upper-case spelling is accepted: {upper}"
        );
    }
    let at = usize::from(plan.at) % s.len();
    let mut edited = s.clone().into_bytes();
    edited[at] = plan.to;
    if let Ok(edited) = String::from_utf8(edited)
        && edited != s
    {
        assert_eq!(
            check_string(&clocked, plan.now, &edited),
            None,
            "edited token accepted: {edited}"
        );
    }
    // A truncated or extended token is refused.
    assert_eq!(clocked.decode(&s[..at]), None);
    assert_eq!(clocked.decode(&format!("{s}0")), None);

    // Issued at the plan's clock: pinned to the endpoint until now + ttl (saturating).
    let ttl = Duration::from_secs(plan.ttl_secs);
    let issuer = TokenCodec::new(KEY_A, ttl)
        .unwrap()
        .with_clock(move || plan.now);
    let issued = issuer.issue(token.endpoint);
    let want = Token {
        endpoint: token.endpoint,
        expires: plan.now.saturating_add(plan.ttl_secs),
    };
    assert_eq!(issuer.decode(&issued), Some(want));
    assert_eq!(
        issuer.check(&issued),
        (want.expires > plan.now).then_some(want)
    );

    // The fuzzer's key: weak below 16 bytes; otherwise its tokens are its own.
    match TokenCodec::new(&plan.key, ttl) {
        Err(weak) => {
            assert!(plan.key.len() < 16, "a {}-byte key refused", plan.key.len());
            assert_eq!(weak.len, plan.key.len());
        }
        Ok(k) => {
            assert!(
                plan.key.len() >= 16,
                "a {}-byte key accepted",
                plan.key.len()
            );
            let k = k.with_clock(move || plan.now);
            let theirs = k.encode(token);
            assert_eq!(check_string(&k, plan.now, &theirs), Some(token));
            check_string(&k, plan.now, &candidate);
            if !same_hmac_key(&plan.key, KEY_A) {
                assert_eq!(a.decode(&theirs), None, "key A accepts another key's token");
                assert_eq!(k.decode(&s), None, "another key accepts key A's token");
            }
        }
    }
});
