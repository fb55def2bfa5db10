//! TLS under marina: `marina_pool::tls::TlsConnector` under `Pool` and `KeyedPool`, and
//! the `Stack` over TLS (`StackBuilder::tls`), against rustls echo servers on loopback
//! with certificates made here (rcgen).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::tls::TestPki;
use integration_tests::{EchoServer, LIMIT, echo_round, eventually, within};
use marina::core::{BoxError, Request, find, is_not_sent};
use marina::pool::tls::{self, TlsConfig, TlsConnector, TlsError};
use marina::pool::{KeyedPool, Pool, PoolError, TcpConnector, socket_is_open};
use marina::{Conn, Stack};
use tokio::io::AsyncWriteExt;
use tower::{Service, ServiceExt};

/// The name the test servers' certificates carry.
const NAME: &str = "echo.test";

async fn tls_echo(pki: &TestPki, names: &[&str]) -> EchoServer {
    EchoServer::start_tls(pki.acceptor(names)).await
}

/// One line through the stack.
async fn line(
    svc: &mut marina::StackService<String, String>,
    text: &str,
) -> Result<String, BoxError> {
    let reply = svc
        .ready()
        .await?
        .call(Request::new(text.to_string()))
        .await?;
    Ok(reply.into_body())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_round_trips_over_tls() {
    let pki = TestPki::new("marina test CA");
    let a = tls_echo(&pki, &[NAME]).await;
    let b = tls_echo(&pki, &[NAME]).await;
    let (mut svc, handle) = Stack::builder::<String>()
        .endpoints([a.addr(), b.addr()])
        .tls(pki.client().server_name(NAME).unwrap())
        .bandwidth(1e9, 1 << 20) // TLS under the bandwidth limiter, as in the design
        .build_line()
        .unwrap();
    for i in 0..40 {
        let text = format!("hello {i}");
        let reply = within(LIMIT, "a request", line(&mut svc, &text)).await;
        assert_eq!(reply.unwrap(), text);
    }
    // Both backends served, and only inside TLS (the echo servers speak nothing else).
    assert!(a.handshakes() > 0 && b.handshakes() > 0);
    let stats = handle.stats();
    assert_eq!(stats.balance.errors, 0, "{stats}");
    // Connections were reused, not reconnected per request.
    let created: u64 = stats.backends.iter().map(|b| b.pool.created).sum();
    assert!(
        created < 20,
        "{created} connections for 40 sequential requests"
    );
    assert!(
        stats.bandwidth.unwrap().0 > 0,
        "bytes went through the limiter"
    );
    assert_eq!(handle.shutdown(Duration::from_secs(2)).await, 0);
}

/// A stack of one TLS backend that cannot be trusted, no health checks (so the error
/// comes back at once): the request's error.
async fn error_from(pki_client: TlsConfig, server: &EchoServer) -> BoxError {
    let (mut svc, handle) = Stack::builder::<String>()
        .endpoints([server.addr()])
        .tls(pki_client)
        .health(None)
        .failfast_timeout(Duration::from_millis(500))
        .build_line()
        .unwrap();
    let err = within(LIMIT, "a failing request", line(&mut svc, "x"))
        .await
        .expect_err("the handshake must fail");
    handle.shutdown(Duration::from_secs(1)).await;
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificates_fail_with_a_typed_not_sent_error() {
    let pki = TestPki::new("marina test CA");
    let stranger = TestPki::new("someone else's CA");

    // Signed by a CA the client does not trust.
    let wrong_ca = tls_echo(&stranger, &[NAME]).await;
    let err = error_from(pki.client().server_name(NAME).unwrap(), &wrong_ca).await;
    let tls = find::<TlsError>(&*err).unwrap_or_else(|| panic!("no TlsError in {err:?}"));
    assert!(tls.is_certificate_error(), "{tls:?}");
    assert_eq!(tls.server_name(), Some(NAME));
    assert!(matches!(
        tls.rustls_error(),
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer
        ))
    ));
    assert!(
        is_not_sent(&*err),
        "a failed handshake is a request never sent: {err:?}"
    );

    // Trusted, but for another name.
    let wrong_name = tls_echo(&pki, &["other.test"]).await;
    let err = error_from(pki.client().server_name(NAME).unwrap(), &wrong_name).await;
    let tls = find::<TlsError>(&*err).unwrap_or_else(|| panic!("no TlsError in {err:?}"));
    assert!(tls.is_certificate_error(), "{tls:?}");
    assert!(
        matches!(
            tls.rustls_error(),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{tls:?}"
    );
    assert!(is_not_sent(&*err));
    // The echo servers never saw a request: their handshakes all failed.
    assert_eq!(wrong_ca.handshakes() + wrong_name.handshakes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_fails_its_handshake_is_failed_over() {
    let pki = TestPki::new("marina test CA");
    let stranger = TestPki::new("someone else's CA");
    let good = tls_echo(&pki, &[NAME]).await;
    for bad in [
        tls_echo(&stranger, &[NAME]).await,    // wrong CA
        tls_echo(&pki, &["other.test"]).await, // wrong name
    ] {
        let (mut svc, handle) = Stack::builder::<String>()
            .endpoints([bad.addr(), good.addr()])
            .tls(pki.client().server_name(NAME).unwrap())
            .build_line()
            .unwrap();
        let mut errors = 0;
        for i in 0..40 {
            let text = format!("request {i}");
            match within(LIMIT, "a request", line(&mut svc, &text)).await {
                Ok(reply) => assert_eq!(reply, text),
                Err(e) => {
                    errors += 1;
                    eprintln!("client error: {e:?}");
                }
            }
        }
        assert_eq!(errors, 0, "a good backend exists: no request may fail");
        let stats = handle.stats();
        let bad_stats = stats
            .backends
            .iter()
            .find(|s| s.addr == bad.addr())
            .unwrap();
        assert!(
            bad_stats.pool.failed > 0,
            "the bad backend was tried: {stats}"
        );
        assert_eq!(bad.handshakes(), 0);
        handle.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_tls_server_hands_out_no_dead_connection() {
    let pki = TestPki::new("marina test CA");
    let server = tls_echo(&pki, &[NAME]).await;
    let (mut svc, handle) = Stack::builder::<String>()
        .endpoints([server.addr()])
        .tls(pki.client().server_name(NAME).unwrap())
        .failover(None) // a dead connection handed out would show as an error
        .build_line()
        .unwrap();
    // Several connections into the pool: concurrent requests.
    let mut calls = Vec::new();
    for i in 0..8 {
        let mut svc = svc.clone();
        calls.push(tokio::spawn(async move {
            line(&mut svc, &format!("warm {i}")).await
        }));
    }
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let before = handle.stats().backends[0].pool.clone();
    assert!(before.idle >= 2, "{before:?}");

    server.shutdown().await;
    server.restart().await.unwrap();
    for i in 0..30 {
        let text = format!("after restart {i}");
        let reply = within(LIMIT, "a request", line(&mut svc, &text)).await;
        assert_eq!(reply.expect("no dead connection handed out"), text);
    }
    let after = handle.stats().backends[0].pool.clone();
    assert!(
        after.destroyed > before.destroyed,
        "the dead idle connections were closed at checkout: {before:?} → {after:?}"
    );
    assert_eq!(handle.stats().balance.errors, 0);
    handle.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_reads_session_tickets_and_sees_closes() {
    let pki = TestPki::new("marina test CA");
    let server = tls_echo(&pki, &[NAME]).await;
    let connector = TlsConnector::new(TcpConnector::new(), pki.client().server_name(NAME).unwrap());
    let mut stream = connector.clone().oneshot(server.addr()).await.unwrap();
    assert!(eventually(LIMIT, || server.handshakes() == 1).await);
    // TLS 1.3: the server's session tickets arrive after the handshake, unread.
    assert!(
        eventually(LIMIT, || !socket_is_open(stream.get_ref().0)).await,
        "session tickets wait on the socket"
    );
    assert!(
        tls::is_open(&mut stream),
        "tickets are not a reply: still open"
    );
    // Every ticket read (a second one may still have been on its way): nothing left.
    assert!(
        eventually(LIMIT, || tls::is_open(&mut stream)
            && socket_is_open(stream.get_ref().0))
        .await,
        "the tickets were consumed"
    );
    assert_eq!(echo_round(&mut stream, b"ping\n").await.unwrap(), b"ping\n");

    // Unread application data: not reusable.
    stream.write_all(b"left unread\n").await.unwrap();
    stream.flush().await.unwrap();
    assert!(eventually(LIMIT, || !tls::is_open(&mut stream)).await);

    // The server goes away: the close is seen through TLS.
    let mut idle = connector.oneshot(server.addr()).await.unwrap();
    assert!(eventually(LIMIT, || server.handshakes() == 2).await);
    assert!(tls::is_open(&mut idle));
    server.shutdown().await;
    assert!(eventually(LIMIT, || !tls::is_open(&mut idle)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_reuses_a_warm_tls_connection() {
    let pki = TestPki::new("marina test CA");
    let server = tls_echo(&pki, &["127.0.0.1"]).await; // the name is the target's IP
    let pool = Pool::builder()
        .min_idle(1)
        .max_size(2)
        .build(
            TlsConnector::new(TcpConnector::new(), pki.client()),
            server.addr(),
        )
        .unwrap();
    pool.ready_min().await.unwrap();
    assert!(eventually(LIMIT, || server.handshakes() == 1).await);
    tokio::time::sleep(Duration::from_millis(20)).await; // the tickets cross loopback
    let mut conn = pool.get().await.unwrap();
    assert_eq!(echo_round(&mut *conn, b"hi\n").await.unwrap(), b"hi\n");
    drop(conn);
    let stats = pool.stats();
    assert_eq!(
        stats.created, 1,
        "the warm connection (session tickets unread) was used, not thrown away: {stats:?}"
    );

    // Restarted: the idle connection is dead and must not be handed out.
    server.shutdown().await;
    server.restart().await.unwrap();
    let mut conn = within(LIMIT, "get", pool.get()).await.unwrap();
    assert_eq!(
        echo_round(&mut *conn, b"again\n").await.unwrap(),
        b"again\n"
    );
    drop(conn);
    let stats = pool.stats();
    assert!(
        stats.destroyed >= 1,
        "the dead one was closed at checkout: {stats:?}"
    );
    within(LIMIT, "close", pool.close()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_pool_over_tls_names_each_target() {
    let pki = TestPki::new("marina test CA");
    let a = tls_echo(&pki, &["localhost"]).await;
    let b = tls_echo(&pki, &["localhost"]).await;
    let connector = TlsConnector::new(TcpConnector::new(), pki.client());
    let mut pools: KeyedPool<_, String> =
        KeyedPool::new(Pool::builder().max_size(2), connector).unwrap();
    for server in [&a, &b] {
        let target = format!("localhost:{}", server.addr().port());
        for _ in 0..3 {
            let mut conn = pools
                .ready()
                .await
                .unwrap()
                .call(target.clone())
                .await
                .unwrap();
            assert_eq!(echo_round(&mut *conn, b"k\n").await.unwrap(), b"k\n");
        }
    }
    assert_eq!(pools.len(), 2);
    assert_eq!(
        a.handshakes() + b.handshakes(),
        2,
        "one connection per target, reused"
    );

    // An IP target verifies the IP: the certificate names only "localhost".
    let by_ip = format!("127.0.0.1:{}", a.addr().port());
    let err = pools.ready().await.unwrap().call(by_ip).await.unwrap_err();
    assert!(matches!(err, PoolError::Connect(_)), "{err:?}");
    let tls = find::<TlsError>(&err).unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(tls.server_name(), Some("127.0.0.1"));
    assert!(tls.is_certificate_error());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_counts_in_the_connect_timeout() {
    // Accepts TCP, never answers the handshake.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            h.lock().unwrap().push(s);
        }
    });
    let pki = TestPki::new("marina test CA");
    let pool = Pool::builder()
        .connect_timeout(Duration::from_millis(100))
        .acquire_timeout(Duration::from_millis(400))
        .build(TlsConnector::new(TcpConnector::new(), pki.client()), addr)
        .unwrap();
    let err = within(LIMIT, "get", pool.get()).await.unwrap_err();
    assert!(
        matches!(err, PoolError::Timeout(_) | PoolError::Connect(_)),
        "{err:?}"
    );
    assert!(
        !held.lock().unwrap().is_empty(),
        "the TCP connect succeeded"
    );
    assert!(pool.stats().failed > 0 || pool.stats().timed_out > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_is_offered_and_read_back() {
    let pki = TestPki::new("marina test CA");
    let config = pki.server_config(&[NAME], &["http/1.1"]);
    let server = EchoServer::start_tls(tokio_rustls::TlsAcceptor::from(Arc::new(config))).await;
    let client = pki
        .client()
        .server_name(NAME)
        .unwrap()
        .alpn(["h2", "http/1.1"]);

    let stream = TlsConnector::new(TcpConnector::new(), client.clone())
        .oneshot(server.addr())
        .await
        .unwrap();
    assert_eq!(tls::alpn_protocol(&stream), Some(&b"http/1.1"[..]));

    // Through the stack: the protocol sees the negotiated protocol on its `Conn`.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([server.addr()])
        .tls(client)
        .build(
            move |conn: Conn| {
                let s = s.clone();
                async move {
                    let t = conn.get_ref();
                    assert!(t.is_tls());
                    s.lock()
                        .unwrap()
                        .push(t.alpn_protocol().map(<[u8]>::to_vec));
                    Ok(marina::line::LineClient::new(conn))
                }
            },
            |c: &mut marina::line::LineClient<Conn>| {
                c.is_open_with_mut(|io| io.get_mut().is_open())
            },
        )
        .unwrap();
    let reply = svc
        .oneshot(Request::new("over tls".to_string()))
        .await
        .unwrap();
    assert_eq!(reply.into_body(), "over tls");
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|p| p.as_deref() == Some(&b"http/1.1"[..])),
        "{seen:?}"
    );
    handle.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn tls_config_reads_ca_files_and_refuses_bad_input() {
    let pki = TestPki::new("marina test CA");
    let dir = std::env::temp_dir().join(format!("marina-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let config = TlsConfig::from_ca_file(&ca).unwrap();
    assert!(config.fixed_server_name().is_none());

    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "no certificate here\n").unwrap();
    let e = TlsConfig::from_ca_file(&empty).unwrap_err();
    assert!(e.to_string().contains("no CA certificate"), "{e}");
    let e = TlsConfig::from_ca_file(dir.join("missing.pem")).unwrap_err();
    assert!(e.to_string().contains("missing.pem"), "{e}");
    let e = config.server_name("not a name").unwrap_err();
    assert!(e.to_string().contains("invalid server name"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_config_tls_section() {
    use marina::StackConfig;

    let pki = TestPki::new("marina test CA");
    let a = tls_echo(&pki, &[NAME]).await;
    let b = tls_echo(&pki, &[NAME]).await;
    let dir = std::env::temp_dir().join(format!("marina-tls-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();

    let text = format!(
        "endpoints = [\"{}\", \"{}\"]\n[tls]\nserver_name = \"{NAME}\"\nca_file = {:?}\nalpn = [\"http/1.1\"]\n",
        a.addr(),
        b.addr(),
        ca.display().to_string(),
    );
    let config = StackConfig::from_toml(&text).unwrap();
    assert_eq!(config.validate(), vec![]);
    let (mut svc, handle) = Stack::from_config::<String>(&config)
        .unwrap()
        .build_line()
        .unwrap();
    for i in 0..10 {
        let text = format!("from a file {i}");
        assert_eq!(line(&mut svc, &text).await.unwrap(), text);
    }
    assert!(a.handshakes() + b.handshakes() > 0, "TLS was used");
    handle.shutdown(Duration::from_secs(1)).await;

    // Each bad setting is a problem at its path, all reported together.
    let bad = format!(
        "endpoints = [\"{}\"]\n[tls]\nserver_name = \"not a name\"\nca_file = {:?}\nalpn = [\"h2\", \"\"]\n",
        a.addr(),
        dir.join("missing.pem").display().to_string(),
    );
    let config = StackConfig::from_toml(&bad).unwrap();
    let paths: Vec<String> = config.validate().into_iter().map(|p| p.path).collect();
    assert_eq!(paths, ["tls.ca_file", "tls.server_name", "tls.alpn[1]"]);
    let err = Stack::from_config::<String>(&config).map(drop).unwrap_err();
    assert_eq!(err.0.len(), 3, "{err}");
    assert!(err.to_string().contains("missing.pem"), "{err}");

    // Without a CA file, the system's roots are needed (a feature of their own).
    let no_ca = format!("endpoints = [\"{}\"]\n[tls]\n", a.addr());
    let problems = StackConfig::from_toml(&no_ca).unwrap().validate();
    assert!(
        problems.iter().all(|p| p.path == "tls.ca_file"),
        "{problems:?}"
    );

    // A typo in the table is refused.
    let typo = format!(
        "endpoints = [\"{}\"]\n[tls]\nservername = \"x\"\n",
        a.addr()
    );
    let e = StackConfig::from_toml(&typo).unwrap_err();
    assert!(e.to_string().contains("servername"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_of_bandwidth_limited_tls_connections() {
    use marina::limit::{BandwidthLimit, Throttled};
    use tokio::net::TcpStream;

    let pki = TestPki::new("marina test CA");
    let server = tls_echo(&pki, &[NAME]).await;
    // TLS under the limiter, as in the stack: the limit counts plaintext bytes.
    let connector = BandwidthLimit::new(TlsConnector::new(
        TcpConnector::new(),
        pki.client().server_name(NAME).unwrap(),
    ))
    .per_connection_write(1e9, 1 << 20);
    let pool = Pool::builder()
        .max_size(2)
        // The pool knows no `Throttled` stream: the check reaches the TLS stream inside.
        .check(|c: &mut Throttled<tls::TlsStream<TcpStream>>| tls::is_open(c.get_mut()))
        .build(connector, server.addr())
        .unwrap();
    for _ in 0..3 {
        let mut conn = within(LIMIT, "get", pool.get()).await.unwrap();
        assert_eq!(echo_round(&mut *conn, b"bw\n").await.unwrap(), b"bw\n");
    }
    assert_eq!(pool.stats().created, 1, "one connection, reused");
    server.shutdown().await;
    server.restart().await.unwrap();
    let mut conn = within(LIMIT, "get", pool.get()).await.unwrap();
    assert_eq!(echo_round(&mut *conn, b"bw\n").await.unwrap(), b"bw\n");
    drop(conn);
    within(LIMIT, "close", pool.close()).await;
}
