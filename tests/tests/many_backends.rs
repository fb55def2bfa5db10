//! Many backends: every backend a stack is built with is routed to from the first
//! requests (discovery drained), a balancer applies every change sent before its next
//! pick however many there are, backends come and go from any thread, start-up does not
//! open `backends × min_idle` connections, and a configuration file sets the warm
//! budget and the pickers' large-set modes.

use std::time::Duration;

use integration_tests::{
    EchoServer, LIMIT, LineServer, LineServerOptions, eventually, split_tag, within,
};
use marina::Stack;
use marina::core::Request;
use marina::pool::Config;
use tower::{Service, ServiceExt};

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

#[tokio::test]
async fn a_balancer_applies_every_change_sent_before_its_next_pick() {
    use std::convert::Infallible;
    use std::future::{Ready, ready};

    use marina::balance::{Balance, RoundRobin};
    use tower::discover::Change;
    use tower::service_fn;

    // Far more changes than tokio's cooperative budget (128 per task poll) lets a
    // channel hand over at once.
    const N: u32 = 1000;
    let answer =
        |k: u32| service_fn(move |_: u32| -> Ready<Result<u32, Infallible>> { ready(Ok(k)) });
    let (tx, mut lb) = Balance::from_channel(RoundRobin::new());
    for k in 0..N {
        tx.send(Change::Insert(k, answer(k))).unwrap();
    }
    // Round robin from the first request: N requests reach N distinct endpoints.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..N {
        seen.insert(lb.ready().await.unwrap().call(0).await.unwrap());
    }
    assert_eq!(
        seen.len(),
        N as usize,
        "the first picks saw {} endpoints",
        seen.len()
    );

    // Half of them leave at once: no later request reaches one.
    for k in 0..N / 2 {
        tx.send(Change::Remove(k)).unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..N {
        let k = lb.ready().await.unwrap().call(0).await.unwrap();
        assert!(
            k >= N / 2,
            "a request reached endpoint {k}, removed before it was sent"
        );
        seen.insert(k);
    }
    assert_eq!(seen.len(), (N / 2) as usize);
}

#[tokio::test]
async fn a_configuration_file_sets_the_warm_budget_and_the_large_set_pickers() {
    use marina::StackConfig;

    let servers = [
        EchoServer::start().await,
        EchoServer::start().await,
        EchoServer::start().await,
    ];
    let list = servers
        .iter()
        .map(|s| format!("\"{}\"", s.addr()))
        .collect::<Vec<_>>()
        .join(", ");
    // 3 warm connections over 3 backends with min_idle 4: one each.
    for picker in [
        "picker = \"least_connections\"\npicker_exact_up_to = 0\npicker_choice_count = 2",
        "picker = \"least_response_time\"\npicker_exact = true",
        "picker = \"weighted_round_robin\"\npicker_smooth = false",
    ] {
        let before: Vec<usize> = servers.iter().map(EchoServer::accepts).collect();
        let text = format!(
            "endpoints = [{list}]\n{picker}\nwarm_connections = 3\n[pool]\nmin_idle = 4\nmax_size = 8\n"
        );
        let config = StackConfig::from_toml(&text).expect("parses");
        assert_eq!(config.validate(), vec![], "{text}");
        let (svc, handle) = Stack::from_config::<String>(&config)
            .expect("valid")
            .build_line()
            .expect("builds");
        let warmed = || {
            servers
                .iter()
                .zip(&before)
                .map(|(s, b)| s.accepts() - b)
                .collect::<Vec<_>>()
        };
        assert!(
            eventually(LIMIT, || warmed() == [1, 1, 1]).await,
            "{picker}: {:?}",
            warmed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(warmed(), [1, 1, 1], "{picker}");
        for i in 0..12 {
            let line = format!("{i}");
            let reply = within(
                LIMIT,
                "a request",
                svc.clone().oneshot(Request::new(line.clone())),
            )
            .await
            .expect("a reply")
            .into_body();
            assert_eq!(reply, line);
        }
        within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await;
    }
}
