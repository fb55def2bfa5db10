//! marina-core's key extraction: `HeaderKey`, `CookieKey`, `ClientIp` (trusted proxies,
//! `X-Forwarded-For`) and `IpNet` parsing, on arbitrary headers.
//!
//! Input: lines (any bytes but `\n`), each one of
//! - `peer=<ip:port or ip>`: the request's `PeerAddr` (none without such a line);
//! - `trust=<net>`: a trusted proxy network (`IpNet` parses any text; unparsable ones are
//!   skipped);
//! - `key=<header name>` / `cookie=<cookie name>`: what `HeaderKey` / `CookieKey` read
//!   (default `x-user` and `SESSION`);
//! - `<name>:<value>`: a request header (skipped if the name or value is not valid).
//!
//! Invariants:
//! - nothing panics; `with_key(req, to_owned)` equals `extract(req)` for every extractor;
//! - keys are 1 to `MAX_KEY_LEN` bytes; a header key is the first such header's value,
//!   trimmed; a cookie key is a piece of one `Cookie` header, without `;`;
//! - `ClientIp`: no peer, no key; an untrusted peer is the answer, whatever the headers;
//!   otherwise the answer is the peer or an address written in `X-Forwarded-For`, never
//!   a trusted proxy's (unless it is the peer), and every hop to its right is a trusted
//!   proxy's address (nothing left of a hop that is not can be believed, as the docs
//!   say: addresses further left are the client's and can be forged). When every
//!   header is text, the answer is exactly the documented rule's;
//! - `IpNet`: a network contains the address it was written with, whole-family networks
//!   (`/0`) contain every address of their family, and an IPv4-mapped IPv6 address
//!   counts as its IPv4 address.
#![no_main]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use http::{HeaderName, HeaderValue, Request};
use libfuzzer_sys::fuzz_target;
use marina::core::{
    ClientIp, CookieKey, HasExtensions, HeaderKey, IpNet, KeyExtractor, MAX_KEY_LEN, PeerAddr,
};

/// `with_key` lends what `extract` gives, and keys are bounded.
fn agree<X: KeyExtractor<Request<()>>>(x: &X, req: &Request<()>) -> Option<String> {
    let key = x.extract(req);
    assert_eq!(
        x.with_key(req, str::to_owned),
        key,
        "with_key and extract disagree"
    );
    if let Some(k) = &key {
        assert!(
            !k.is_empty() && k.len() <= MAX_KEY_LEN,
            "a key of {} bytes",
            k.len()
        );
    }
    key
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| s.parse::<IpAddr>())
        .ok()
}

/// `ip` as IPv4 when it is IPv4-mapped.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn check_net(text: &str, net: &IpNet) {
    // The address it was written with (the parse accepted it, so this parses too).
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let addr: IpAddr = addr.trim().parse().expect("IpNet parsed this address");
    let prefix: Option<u8> = prefix.map(|p| p.trim().parse().expect("IpNet parsed this prefix"));
    assert!(
        net.contains(addr),
        "{text:?} does not contain its own address {addr}"
    );
    if let IpAddr::V4(v4) = addr {
        assert!(
            net.contains(IpAddr::V6(v4.to_ipv6_mapped())),
            "{text:?}: mapped {v4}"
        );
    }
    // A /0 holds its whole family (not checked for an IPv4-mapped address: either family
    // is a fair reading there).
    if prefix == Some(0) && canonical(addr) == addr {
        let other = match addr {
            IpAddr::V4(_) => IpAddr::V4([255, 255, 255, 255].into()),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0xffff, 1, 2, 3, 4, 5, 6, 7)),
        };
        assert!(
            net.contains(other),
            "{text:?} (a /0) does not contain {other}"
        );
    }
}

/// One `X-Forwarded-For` element, as bytes, trimmed.
fn hops(values: &[&HeaderValue]) -> Vec<Vec<u8>> {
    values
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|h| h.trim_ascii().to_vec())
        .collect()
}

fn hop_ip(hop: &[u8]) -> Option<IpAddr> {
    std::str::from_utf8(hop).ok()?.parse().ok()
}

fuzz_target!(|data: &[u8]| {
    let mut req = Request::new(());
    let mut peer = None;
    let mut nets = Vec::new();
    let mut header_name = HeaderName::from_static("x-user");
    let mut cookie_name = String::from("SESSION");
    for line in data.split(|&b| b == b'\n') {
        if let Some(v) = line.strip_prefix(b"peer=") {
            peer = std::str::from_utf8(v).ok().and_then(parse_ip);
        } else if let Some(v) = line.strip_prefix(b"trust=") {
            let text = String::from_utf8_lossy(v);
            if let Ok(net) = text.parse::<IpNet>() {
                check_net(&text, &net);
                nets.push(net);
            }
        } else if let Some(v) = line.strip_prefix(b"key=") {
            if let Ok(name) = HeaderName::from_bytes(v) {
                header_name = name;
            }
        } else if let Some(v) = line.strip_prefix(b"cookie=") {
            cookie_name = String::from_utf8_lossy(v).into_owned();
        } else if let Some(i) = line.iter().position(|&b| b == b':')
            && let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(&line[..i]),
                HeaderValue::from_bytes(&line[i + 1..]),
            )
        {
            req.headers_mut().append(name, value);
        }
    }
    if let Some(ip) = peer {
        req.extensions_mut()
            .insert(PeerAddr(SocketAddr::new(ip, 5555)));
    }

    // HeaderKey: the first such header's value, trimmed, when it is text.
    let header = HeaderKey::new(header_name.as_str());
    let key = agree(&header, &req);
    let first = req
        .headers()
        .get(&header_name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    match (&key, first) {
        (Some(k), Some(v)) => assert_eq!(k, v),
        (Some(k), None) => panic!("header key {k:?} without a text header"),
        (None, Some(v)) => assert!(v.is_empty() || v.len() > MAX_KEY_LEN, "{v:?} not read"),
        (None, None) => {}
    }

    // CookieKey: a piece of one Cookie header.
    let cookie = CookieKey::new(cookie_name.clone());
    if let Some(k) = agree(&cookie, &req) {
        assert!(!k.contains(';'), "cookie {k:?} holds ';'");
        let found = req
            .headers()
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains(k.as_str()));
        assert!(found, "cookie key {k:?} is in no Cookie header");
    }

    // ClientIp.
    let mut client_ip = ClientIp::new();
    for net in &nets {
        client_ip = client_ip.trust_proxy(*net);
    }
    let trusted = |ip: IpAddr| nets.iter().any(|n| n.contains(ip));
    let key = agree(&client_ip, &req);
    let got = client_ip.client_ip(&req);
    assert_eq!(
        key,
        got.map(|ip| ip.to_string()),
        "extract is not client_ip's text"
    );
    // The raw-request extractor reads the peer alone.
    let mut raw = marina::core::Request::new(());
    if let Some(ip) = peer {
        raw.extensions_mut()
            .insert(PeerAddr(SocketAddr::new(ip, 5555)));
    }
    let raw_key = client_ip.extract(&raw);
    assert_eq!(client_ip.with_key(&raw, str::to_owned), raw_key);
    assert_eq!(raw_key, peer.map(|ip| ip.to_string()));

    let Some(peer) = peer else {
        assert_eq!(got, None, "a client address without a peer");
        return;
    };
    let got = got.expect("a peer, so an address");
    if !trusted(peer) {
        assert_eq!(got, peer, "an untrusted peer's headers were believed");
        return;
    }
    let values: Vec<&HeaderValue> = req.headers().get_all("x-forwarded-for").iter().collect();
    let hops = hops(&values);
    if got != peer {
        assert!(!trusted(got), "answered a trusted proxy's address {got}");
        // Rightmost first: everything right of the answer is a trusted proxy.
        let at = hops
            .iter()
            .rposition(|h| hop_ip(h) == Some(got))
            .unwrap_or_else(|| panic!("{got} is neither the peer nor in X-Forwarded-For"));
        for h in &hops[at + 1..] {
            assert!(
                hop_ip(h).is_some_and(trusted),
                "answered {got}, left of {:?}, which is no trusted proxy's address",
                String::from_utf8_lossy(h)
            );
        }
    }
    // All text: exactly the documented rule, right to left.
    if values.iter().all(|v| v.to_str().is_ok()) {
        let mut want = peer;
        for h in hops.iter().rev() {
            match hop_ip(h) {
                Some(ip) if trusted(ip) => continue,
                Some(ip) => want = ip,
                None => want = peer,
            }
            break;
        }
        assert_eq!(got, want, "not the rightmost untrusted hop");
    }
});
