//! Unit tests of the session-key extractors the affinity layer reads with
//! (`marina_core::KeyExtractor`): `HeaderKey`, `CookieKey`, `ClientIp` behind trusted
//! proxies, and closures; keys longer than `MAX_KEY_LEN` are treated as absent by
//! every one of them.

use std::net::IpAddr;

use marina_core::{ClientIp, CookieKey, HeaderKey, IpNet, KeyExtractor, MAX_KEY_LEN, PeerAddr};

fn request(headers: &[(&str, &str)]) -> http::Request<()> {
    let mut b = http::Request::builder();
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

fn from_peer(peer: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut req = request(headers);
    req.extensions_mut().insert(PeerAddr(peer.parse().unwrap()));
    req
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// HeaderKey
// ---------------------------------------------------------------------------------------

#[test]
fn header_key_reads_one_header() {
    let key = HeaderKey::new("x-session");
    assert_eq!(
        key.extract(&request(&[("x-session", "abc")])).as_deref(),
        Some("abc")
    );
    // Header names are case-insensitive; surrounding blanks are trimmed.
    let key_upper = HeaderKey::new("X-Session");
    assert_eq!(
        key_upper
            .extract(&request(&[("x-session", "  abc \t")]))
            .as_deref(),
        Some("abc")
    );
    // Missing, empty or blank: no key.
    assert_eq!(key.extract(&request(&[])), None);
    assert_eq!(key.extract(&request(&[("x-other", "abc")])), None);
    assert_eq!(key.extract(&request(&[("x-session", "")])), None);
    assert_eq!(key.extract(&request(&[("x-session", "   ")])), None);
    // The first of repeated headers.
    assert_eq!(
        key.extract(&request(&[("x-session", "one"), ("x-session", "two")]))
            .as_deref(),
        Some("one")
    );
}

#[test]
fn header_key_ignores_non_text_values() {
    let key = HeaderKey::new("x-session");
    let mut req = request(&[]);
    req.headers_mut().insert(
        "x-session",
        http::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
    );
    assert_eq!(key.extract(&req), None);
}

#[test]
#[should_panic(expected = "a valid header name")]
fn header_key_panics_on_an_invalid_name() {
    let _ = HeaderKey::new("not a header name");
}

// ---------------------------------------------------------------------------------------
// CookieKey
// ---------------------------------------------------------------------------------------

#[test]
fn cookie_key_finds_its_cookie() {
    let key = CookieKey::new("SESSION");
    let get = |cookies: &[&str]| {
        let headers: Vec<_> = cookies.iter().map(|c| ("cookie", *c)).collect();
        key.extract(&request(&headers))
    };
    assert_eq!(get(&["SESSION=abc"]).as_deref(), Some("abc"));
    assert_eq!(
        get(&["theme=dark; SESSION=abc; lang=en"]).as_deref(),
        Some("abc")
    );
    assert_eq!(get(&["theme=dark;SESSION=abc"]).as_deref(), Some("abc"));
    // Across several Cookie headers.
    assert_eq!(
        get(&["theme=dark", "lang=en; SESSION=xyz"]).as_deref(),
        Some("xyz")
    );
    // The first occurrence wins.
    assert_eq!(
        get(&["SESSION=first; SESSION=second"]).as_deref(),
        Some("first")
    );
    // Quoted values lose their quotes.
    assert_eq!(get(&["SESSION=\"abc\""]).as_deref(), Some("abc"));
    // Values may contain '='.
    assert_eq!(get(&["SESSION=a=b=="]).as_deref(), Some("a=b=="));
    // Names match exactly: not a prefix, not a suffix, case-sensitive.
    assert_eq!(get(&["XSESSION=abc; SESSION_ID=def"]), None);
    assert_eq!(get(&["session=abc"]), None);
    assert_eq!(get(&["XSESSION=abc; SESSION=def"]).as_deref(), Some("def"));
    // Missing or empty: no key.
    assert_eq!(get(&[]), None);
    assert_eq!(get(&["theme=dark"]), None);
    assert_eq!(get(&["SESSION="]), None);
    assert_eq!(get(&["SESSION=\"\""]), None);
    assert_eq!(get(&["SESSION"]), None);
    assert_eq!(get(&[";;; ;"]), None);
}

#[test]
fn cookie_key_reads_no_other_header() {
    let key = CookieKey::new("SESSION");
    assert_eq!(
        key.extract(&request(&[("set-cookie", "SESSION=abc")])),
        None
    );
    assert_eq!(key.extract(&request(&[("x-session", "SESSION=abc")])), None);
}

// ---------------------------------------------------------------------------------------
// ClientIp
// ---------------------------------------------------------------------------------------

#[test]
fn client_ip_without_trusted_proxies_is_the_peer() {
    let ip = ClientIp::new();
    let req = from_peer("198.51.100.7:4000", &[("x-forwarded-for", "203.0.113.9")]);
    assert_eq!(ip.extract(&req).as_deref(), Some("198.51.100.7"));
    // No peer address: no key.
    assert_eq!(
        ip.extract(&request(&[("x-forwarded-for", "203.0.113.9")])),
        None
    );
}

#[test]
fn client_ip_reads_forwarded_for_from_the_right() {
    let ip = ClientIp::new()
        .trust_proxy(net("10.0.0.0/8"))
        .trust_proxy(net("192.0.2.1"));
    let xff = |peer: &str, value: &str| ip.extract(&from_peer(peer, &[("x-forwarded-for", value)]));
    // The rightmost untrusted hop is the client; what is left of it may be forged.
    assert_eq!(
        xff("10.0.0.1:1", "6.6.6.6, 203.0.113.9, 10.0.0.7, 192.0.2.1").as_deref(),
        Some("203.0.113.9")
    );
    assert_eq!(
        xff("10.0.0.1:1", "203.0.113.9").as_deref(),
        Some("203.0.113.9")
    );
    assert_eq!(
        xff("10.0.0.1:1", " 203.0.113.9 ,10.2.3.4 ").as_deref(),
        Some("203.0.113.9")
    );
    // A trusted peer that forwards no header: the peer.
    assert_eq!(
        ip.extract(&from_peer("10.0.0.1:1", &[])).as_deref(),
        Some("10.0.0.1")
    );
    // A single address is trusted exactly, not its neighbours.
    assert_eq!(
        xff("192.0.2.2:1", "203.0.113.9").as_deref(),
        Some("192.0.2.2")
    );
    assert_eq!(
        xff("192.0.2.1:1", "203.0.113.9").as_deref(),
        Some("203.0.113.9")
    );
}

#[test]
fn client_ip_joins_repeated_forwarded_for_headers_in_order() {
    let ip = ClientIp::new().trust_proxy(net("10.0.0.0/8"));
    let req = from_peer(
        "10.0.0.1:1",
        &[
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-for", "203.0.113.2, 10.0.0.5"),
        ],
    );
    assert_eq!(ip.extract(&req).as_deref(), Some("203.0.113.2"));
}

#[test]
fn client_ip_ignores_forwarded_for_from_an_untrusted_peer() {
    let ip = ClientIp::new().trust_proxy(net("10.0.0.0/8"));
    for xff in ["203.0.113.9", "10.0.0.7", "garbage"] {
        let req = from_peer("198.51.100.1:5555", &[("x-forwarded-for", xff)]);
        assert_eq!(ip.extract(&req).as_deref(), Some("198.51.100.1"), "{xff}");
    }
}

#[test]
fn client_ip_stops_at_a_garbled_hop() {
    let ip = ClientIp::new().trust_proxy(net("10.0.0.0/8"));
    // Nothing at or left of a hop that does not parse can be trusted: the peer.
    for xff in [
        "203.0.113.9, garbage, 10.0.0.7",
        "203.0.113.9, , 10.0.0.7",
        "203.0.113.9:8080",
        "unknown",
        "",
    ] {
        let req = from_peer("10.0.0.1:1", &[("x-forwarded-for", xff)]);
        assert_eq!(ip.extract(&req).as_deref(), Some("10.0.0.1"), "{xff:?}");
    }
    // A garbled hop left of the client does not matter.
    let req = from_peer(
        "10.0.0.1:1",
        &[("x-forwarded-for", "garbage, 203.0.113.9, 10.0.0.7")],
    );
    assert_eq!(ip.extract(&req).as_deref(), Some("203.0.113.9"));
}

#[test]
fn client_ip_handles_ipv6() {
    let ip = ClientIp::new().trust_proxy(net("fd00::/8"));
    let req = from_peer(
        "[fd00::1]:443",
        &[("x-forwarded-for", "2001:db8::42, fd00::7")],
    );
    assert_eq!(ip.extract(&req).as_deref(), Some("2001:db8::42"));
    assert_eq!(
        ip.client_ip(&req),
        Some("2001:db8::42".parse::<IpAddr>().unwrap())
    );
    let untrusted = from_peer("[2001:db8::1]:443", &[("x-forwarded-for", "2001:db8::42")]);
    assert_eq!(ip.extract(&untrusted).as_deref(), Some("2001:db8::1"));
    // An IPv4 client behind an IPv6 proxy.
    let mixed = from_peer("[fd00::1]:443", &[("x-forwarded-for", "203.0.113.9")]);
    assert_eq!(ip.extract(&mixed).as_deref(), Some("203.0.113.9"));
}

#[test]
fn client_ip_trusts_ipv4_mapped_peers_as_ipv4() {
    // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
    let ip = ClientIp::new().trust_proxy(net("10.0.0.0/8"));
    let req = from_peer(
        "[::ffff:10.0.0.1]:443",
        &[("x-forwarded-for", "203.0.113.9, ::ffff:10.0.0.7")],
    );
    assert_eq!(ip.extract(&req).as_deref(), Some("203.0.113.9"));
    // Untrusted mapped peer: itself, XFF ignored.
    let req = from_peer(
        "[::ffff:198.51.100.1]:443",
        &[("x-forwarded-for", "203.0.113.9")],
    );
    assert_eq!(
        ip.client_ip(&req),
        Some("::ffff:198.51.100.1".parse::<IpAddr>().unwrap())
    );
    // IpNet::contains, directly.
    let ten = net("10.0.0.0/8");
    assert!(ten.contains("::ffff:10.1.2.3".parse().unwrap()));
    assert!(!ten.contains("::ffff:11.1.2.3".parse().unwrap()));
    assert!(
        !ten.contains("::10.1.2.3".parse().unwrap()),
        "IPv4-compatible is not mapped"
    );
}

#[test]
fn ip_networks_parse_and_match() {
    assert!(net("0.0.0.0/0").contains("203.0.113.9".parse().unwrap()));
    assert!(!net("0.0.0.0/0").contains("2001:db8::1".parse().unwrap()));
    assert!(net("::/0").contains("2001:db8::1".parse().unwrap()));
    assert!(net("203.0.113.0/24").contains("203.0.113.255".parse().unwrap()));
    assert!(!net("203.0.113.0/24").contains("203.0.114.0".parse().unwrap()));
    assert!(net("2001:db8::/32").contains("2001:db8:ffff::1".parse().unwrap()));
    assert!(!net("2001:db8::/32").contains("2001:db9::1".parse().unwrap()));
    for bad in [
        "10.0.0.0/33",
        "::/129",
        "10.0.0/8",
        "nonsense",
        "10.0.0.0/x",
        "",
    ] {
        assert!(bad.parse::<IpNet>().is_err(), "{bad:?}");
    }
}

#[test]
fn client_ip_of_a_raw_protocol_request_is_its_peer() {
    let ip = ClientIp::new().trust_proxy(net("10.0.0.0/8"));
    let mut req = marina_core::Request::new("PING");
    assert_eq!(ip.extract(&req), None);
    req.extensions
        .insert(PeerAddr("10.0.0.1:9".parse().unwrap()));
    assert_eq!(ip.extract(&req).as_deref(), Some("10.0.0.1"));
}

// ---------------------------------------------------------------------------------------
// Length bound and closures
// ---------------------------------------------------------------------------------------

#[test]
fn over_long_keys_are_absent() {
    let longest = "k".repeat(MAX_KEY_LEN);
    let too_long = "k".repeat(MAX_KEY_LEN + 1);

    let header = HeaderKey::new("x-session");
    assert_eq!(
        header.extract(&request(&[("x-session", &longest)])),
        Some(longest.clone())
    );
    assert_eq!(header.extract(&request(&[("x-session", &too_long)])), None);

    let cookie = CookieKey::new("s");
    assert_eq!(
        cookie.extract(&request(&[("cookie", &format!("s={longest}"))])),
        Some(longest.clone())
    );
    assert_eq!(
        cookie.extract(&request(&[("cookie", &format!("s={too_long}"))])),
        None
    );
    // Measured after the quotes are removed.
    assert_eq!(
        cookie.extract(&request(&[("cookie", &format!("s=\"{longest}\""))])),
        Some(longest.clone())
    );

    let closure = |r: &http::Request<()>| {
        r.headers()
            .get("x-body")
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(
        closure.extract(&request(&[("x-body", &longest)])),
        Some(longest.clone())
    );
    assert_eq!(closure.extract(&request(&[("x-body", &too_long)])), None);
    assert_eq!(closure.extract(&request(&[])), None);
}

#[test]
fn closures_are_extractors() {
    let by_path = |r: &http::Request<()>| Some(r.uri().path().to_string());
    let req = http::Request::builder().uri("/users/42").body(()).unwrap();
    assert_eq!(by_path.extract(&req).as_deref(), Some("/users/42"));
    let raw = |r: &marina_core::Request<(String, u32)>| Some(r.body.0.clone());
    assert_eq!(
        raw.extract(&marina_core::Request::new(("alice".to_string(), 1)))
            .as_deref(),
        Some("alice")
    );
}
