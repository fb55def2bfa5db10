//! Many backends: every backend a stack is built with is routed to from the first
//! requests (discovery drained), backends come and go from any thread, and start-up
//! does not open `backends × min_idle` connections.

use std::time::Duration;

use integration_tests::{
    EchoServer, LIMIT, LineServer, LineServerOptions, eventually, split_tag, within,
};
use marina::Stack;
use marina::core::Request;
use marina::pool::Config;
use tower::ServiceExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_of_200_backends_routes_over_all_of_them_from_the_start() {
    const N: usize = 200;
    let mut servers = Vec::new();
    for _ in 0..N {
        servers.push(
            LineServer::start(LineServerOptions {
                tag: true,
                ..LineServerOptions::default()
            })
            .await,
        );
    }
    let (svc, handle) = Stack::builder::<String>()
        .endpoints(servers.iter().map(LineServer::addr))
        .build_line()
        .expect("a valid stack");
    // Round robin: the first N requests reach N distinct backends.
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..N {
        let reply = within(
            LIMIT,
            "a request",
            svc.clone().oneshot(Request::new(format!("r{i}"))),
        )
        .await
        .expect("a reply")
        .into_body();
        ports.insert(split_tag(&reply).expect("tagged").0);
    }
    assert_eq!(
        ports.len(),
        N,
        "requests reached {} of {N} backends",
        ports.len()
    );
    assert_eq!(handle.stats().backends.len(), N);
    within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await;
}

#[tokio::test]
async fn start_up_warms_within_a_budget() {
    let servers = [
        EchoServer::start().await,
        EchoServer::start().await,
        EchoServer::start().await,
        EchoServer::start().await,
    ];
    let pool = Config {
        min_idle: 4,
        max_size: 8,
        ..Config::balanced()
    };
    // A budget of 8 over 4 backends: 2 warm connections each, not 4.
    let (_svc, handle) = Stack::builder::<String>()
        .endpoints(servers.iter().map(EchoServer::addr))
        .pool(pool.clone())
        .warm_connections(8)
        .build_line()
        .expect("a valid stack");
    assert!(
        eventually(LIMIT, || servers.iter().all(|s| s.accepts() == 2)).await,
        "accepts: {:?}",
        servers.iter().map(EchoServer::accepts).collect::<Vec<_>>()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(servers.iter().all(|s| s.accepts() == 2));
    within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await;

    // No budget limit: every pool warms its min_idle.
    let more = [EchoServer::start().await, EchoServer::start().await];
    let (_svc, handle) = Stack::builder::<String>()
        .endpoints(more.iter().map(EchoServer::addr))
        .pool(pool)
        .warm_connections(usize::MAX)
        .build_line()
        .expect("a valid stack");
    assert!(eventually(LIMIT, || more.iter().all(|s| s.accepts() == 4)).await);
    within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_are_added_and_removed_from_threads_outside_the_runtime() {
    let a = LineServer::start(LineServerOptions {
        tag: true,
        ..LineServerOptions::default()
    })
    .await;
    let b = LineServer::start(LineServerOptions {
        tag: true,
        ..LineServerOptions::default()
    })
    .await;
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([a.addr()])
        .build_line()
        .expect("a valid stack");
    // From a plain OS thread: no runtime there.
    let h = handle.clone();
    let b_addr = b.addr();
    std::thread::spawn(move || h.add_endpoint(b_addr))
        .join()
        .unwrap()
        .expect("added");
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..10 {
        let reply = within(
            LIMIT,
            "a request",
            svc.clone().oneshot(Request::new(format!("r{i}"))),
        )
        .await
        .expect("a reply")
        .into_body();
        seen.insert(split_tag(&reply).unwrap().0);
    }
    assert!(
        seen.contains(&b_addr.port()),
        "the added backend got nothing"
    );

    let h = handle.clone();
    assert!(
        std::thread::spawn(move || h.remove_endpoint(b_addr))
            .join()
            .unwrap()
    );
    // Its pool closes and it leaves the stats, though no runtime called it.
    assert!(
        eventually(LIMIT, || handle
            .stats()
            .backends
            .iter()
            .all(|s| s.addr != b_addr))
        .await,
        "{}",
        handle.stats()
    );
    assert!(eventually(LIMIT, || b.open_connections() == 0).await);
    for i in 0..6 {
        let reply = within(
            LIMIT,
            "a request",
            svc.clone().oneshot(Request::new(format!("s{i}"))),
        )
        .await
        .expect("a reply")
        .into_body();
        assert_eq!(split_tag(&reply).unwrap().0, a.addr().port());
    }
    within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await;
}
