//! Backends added and removed at run time through `StackHandle`, on loopback TCP.

use std::net::SocketAddr;
use std::time::Duration;

use marina::Stack;
use marina::core::Request;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

/// A line echo server on 127.0.0.1 that prefixes replies with `tag:`.
async fn server(tag: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if w.write_all(format!("{tag}:{l}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn endpoints_come_and_go() {
    let a = server("a").await;
    let b = server("b").await;
    let (mut svc, handle) = Stack::builder::<String>()
        .endpoints([a])
        .build_line()
        .unwrap();
    let mut call = async |line: &str| -> String {
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(line.to_string()))
            .await
            .unwrap();
        resp.body
    };
    for i in 0..4 {
        assert_eq!(call(&format!("x{i}")).await, format!("a:x{i}"));
    }
    handle.add_endpoint(b).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..10 {
        seen.insert(call(&format!("y{i}")).await[..1].to_string());
    }
    assert_eq!(
        seen.len(),
        2,
        "both backends serve once b is added: {seen:?}"
    );
    assert!(handle.remove_endpoint(a));
    for i in 0..10 {
        assert_eq!(
            call(&format!("z{i}")).await,
            format!("b:z{i}"),
            "a was removed"
        );
    }
    // a's pool drains, closes and leaves the stats; removing it again is refused.
    assert!(!handle.remove_endpoint(a));
    for _ in 0..100 {
        if handle.stats().backends.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(handle.stats().backends.len(), 1, "a's pool closed and left");
    assert!(handle.add_endpoint(b).is_err(), "b is in the stack already");
    assert_eq!(handle.shutdown(Duration::from_secs(1)).await, 0);
    assert!(handle.stats().backends.iter().all(|b| b.pool.total == 0));
    assert!(
        handle.add_endpoint(a).is_err(),
        "no backends after shutdown"
    );
}

/// A discovery stream over a channel.
struct Changes(tokio::sync::mpsc::UnboundedReceiver<tower::discover::Change<SocketAddr, ()>>);

impl futures_core::Stream for Changes {
    type Item = tower::discover::Change<SocketAddr, ()>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

#[tokio::test]
async fn the_stack_follows_discovery_and_probes_backends() {
    use marina::health::{ActiveConfig, LineProbe, Status};
    use tower::discover::Change;

    let a = server("a").await;
    let b = server("b").await;
    let (mut svc, handle) = Stack::builder::<String>()
        .endpoints([a])
        // The probe sends "ping" and expects the tagged echo back.
        .probe(
            ActiveConfig {
                interval: Duration::from_millis(20),
                ..ActiveConfig::default()
            },
            LineProbe::new("ping", "b:ping"),
        )
        .build_line()
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = handle.follow(Changes(rx));
    tx.send(Change::Insert(b, ())).unwrap();
    // b answers the probe as expected; a answers "a:ping" and is taken out by probes.
    let ha = loop {
        if let Some(h) = handle.health(b) {
            break h;
        }
        tokio::task::yield_now().await;
    };
    let mut a_status = handle.health(a).unwrap().subscribe();
    tokio::time::timeout(
        Duration::from_secs(5),
        a_status.wait_for(|s| matches!(s, Status::Ejected { .. })),
    )
    .await
    .expect("a taken out by its probe")
    .unwrap();
    drop(ha);
    for i in 0..6 {
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(format!("q{i}")))
            .await
            .unwrap();
        assert_eq!(resp.body, format!("b:q{i}"), "only b is in service");
    }
    tx.send(Change::Remove(b)).unwrap();
    drop(tx);
    task.await.unwrap();
    assert_eq!(handle.shutdown(Duration::from_secs(1)).await, 0);
}

/// Hash affinity picks the consistent-hash picker by default: two independent stacks
/// over the same backends send each key to the same backend.
#[tokio::test]
async fn hash_affinity_agrees_across_stacks() {
    use marina::{AffinityMode, KeyFnBox};

    let addrs = [server("a").await, server("b").await, server("c").await];
    let key = KeyFnBox::new(|r: &Request<String>| Some(r.body.clone()));
    let mut stacks = Vec::new();
    for _ in 0..2 {
        let (svc, handle) = Stack::builder::<String>()
            .endpoints(addrs)
            .affinity(AffinityMode::Hash(key.clone()))
            .build_line()
            .unwrap();
        stacks.push((svc, handle));
    }
    let mut used = std::collections::BTreeSet::new();
    for k in 0..30 {
        let mut tags = Vec::new();
        for (svc, _) in &mut stacks {
            for _ in 0..2 {
                let resp = svc
                    .ready()
                    .await
                    .unwrap()
                    .call(Request::new(format!("key{k}")))
                    .await
                    .unwrap();
                tags.push(resp.body[..1].to_string());
            }
        }
        assert!(tags.iter().all(|t| *t == tags[0]), "key{k}: {tags:?}");
        used.insert(tags[0].clone());
    }
    assert_eq!(used.len(), 3, "keys spread over every backend: {used:?}");
    for (_, h) in &stacks {
        assert_eq!(h.shutdown(Duration::from_secs(1)).await, 0);
    }
}
