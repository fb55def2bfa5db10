//! marina-pool's `redis` adapter against a real Redis server.
//!
//! The server is `MARINA_REDIS_URL` (default `redis://127.0.0.1:6379`); `.ci/run` starts
//! one if none answers. These tests fail, rather than skip, when it is not there.
//!
//! - Connections the server killed (`CLIENT KILL`) fail their checkout `PING` and are
//!   replaced; stats count them destroyed.
//! - A connect the server refuses for good (a database index out of range) comes back
//!   at once; a refused TCP connect is retried until the acquire timeout and reported
//!   with the last connect error.

use std::error::Error as _;
use std::time::Duration;

use marina_pool::redis::{RedisConnector, RedisPool};
use marina_pool::{ConnectRetry, Managed, Pool, RetriesExhausted};
use redis::aio::MultiplexedConnection;
use redis::{ConnectionInfo, IntoConnectionInfo};

fn redis_info() -> ConnectionInfo {
    let url = std::env::var("MARINA_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    url.as_str()
        .into_connection_info()
        .unwrap_or_else(|e| panic!("MARINA_REDIS_URL {url:?} does not parse: {e}"))
}

fn builder() -> marina_pool::Builder {
    Pool::builder()
        .max_size(4)
        .acquire_timeout(Duration::from_secs(10))
        .health_check_interval(None)
}

async fn admin() -> MultiplexedConnection {
    let info = redis_info();
    tokio::time::timeout(Duration::from_secs(10), async {
        redis::Client::open(info.clone())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
    })
    .await
    .expect("Redis answers in time (is MARINA_REDIS_URL's server running?)")
    .unwrap_or_else(|e| panic!("Redis at {info:?} is not reachable: {e}"))
}

async fn client_id(conn: &mut MultiplexedConnection) -> i64 {
    redis::cmd("CLIENT")
        .arg("ID")
        .query_async(conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_are_replaced_at_checkout() {
    const N: usize = 4;
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut admin = admin().await;
        let pool: RedisPool = builder()
            .build(Managed::new(RedisConnector::new()), redis_info())
            .unwrap();

        let mut held = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..N {
            let mut c = pool.get().await.expect("connect");
            ids.push(client_id(&mut c).await);
            held.push(c);
        }
        drop(held);
        for id in &ids {
            let killed: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(*id)
                .query_async(&mut admin)
                .await
                .unwrap();
            assert_eq!(killed, 1, "client {id} was killed");
        }

        let mut held = Vec::new();
        for _ in 0..N {
            let mut c = pool.get().await.expect("a live connection");
            let id = client_id(&mut c).await;
            assert!(!ids.contains(&id), "a new connection, not killed {id}");
            held.push(c);
        }
        let s = pool.stats();
        println!("{s:#?}");
        assert_eq!(
            s.destroyed, N as u64,
            "the killed connections were counted: {s:#?}"
        );
        assert_eq!((s.created, s.total), (2 * N as u64, N), "{s:#?}");
    })
    .await
    .expect("the test ran within 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_connect_error_comes_back_at_once() {
    let info = redis_info();
    // Redis has 16 databases by default: SELECT of this one is refused.
    let settings = info.redis_settings().clone().set_db(99_999);
    let info = info.set_redis_settings(settings);
    let pool: RedisPool = builder()
        .acquire_timeout(Duration::from_secs(60))
        .connect_retry(ConnectRetry::Always)
        .build(Managed::new(RedisConnector::new()), info)
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), pool.get())
        .await
        .expect("returned at once, not retried until the acquire timeout")
        .expect_err("the server refuses the database");
    assert!(err.is_connect(), "{err:?}");
    let re = err
        .source()
        .and_then(|s| s.downcast_ref::<redis::RedisError>())
        .unwrap_or_else(|| panic!("the server's error is the source: {err:?}"));
    assert!(re.to_string().to_lowercase().contains("db index"), "{re}");
    assert_eq!(pool.stats().failed, 1, "tried once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_retried_until_the_acquire_timeout() {
    // A port nothing listens on, held for the test.
    let hold = tokio::net::TcpSocket::new_v4().unwrap();
    hold.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = hold.local_addr().unwrap().port();
    let info = format!("redis://127.0.0.1:{port}")
        .into_connection_info()
        .unwrap();
    let pool: RedisPool = builder()
        .acquire_timeout(Duration::from_millis(300))
        .connect_retry(ConnectRetry::Always)
        .build(Managed::new(RedisConnector::new()), info)
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), pool.get())
        .await
        .expect("bounded by the acquire timeout")
        .expect_err("refused");
    let exhausted = err
        .source()
        .and_then(|s| s.downcast_ref::<RetriesExhausted>())
        .unwrap_or_else(|| panic!("retried until the time ran out: {err:?}"));
    assert!(exhausted.attempts() > 1, "{exhausted:?}");
    let last = exhausted
        .last_error()
        .downcast_ref::<redis::RedisError>()
        .expect("the last connect error");
    assert!(last.is_connection_refusal(), "{last:?}");
}
