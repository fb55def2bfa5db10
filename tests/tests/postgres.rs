//! marina-pool's `postgres` adapter against a real PostgreSQL server.
//!
//! The server is `MARINA_PG_URL` (default `host=127.0.0.1 user=postgres dbname=test`);
//! `.ci/run` starts one if none answers. These tests fail, rather than skip, when it is
//! not there.
//!
//! - Clients whose server sessions were terminated (`pg_terminate_backend`, as in a
//!   restart) are found dead at checkout and replaced; stats count them destroyed.
//! - A restart under 16 busy tasks — a TCP proxy in front of the server drops every
//!   connection and refuses new ones for 0.3 s — costs no checkout an error.
//! - An unknown database or user fails at once with the server's message, even with
//!   retries always on and a 60 s acquire timeout.

use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use marina_pool::postgres::{PgConnector, PgPool};
use marina_pool::{ConnectRetry, Managed, Pool};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Config, NoTls};

/// The server's configuration, from `MARINA_PG_URL`.
fn pg_config() -> Config {
    let url = std::env::var("MARINA_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let mut config: Config = url
        .parse()
        .unwrap_or_else(|e| panic!("MARINA_PG_URL {url:?} does not parse: {e}"));
    config.connect_timeout(Duration::from_secs(5));
    config
}

/// The configuration with an application name unique to this test, so it can find and
/// terminate its own sessions (and no one else's) on a shared server.
fn tagged(tag: &str) -> (Config, String) {
    let name = format!("marina-{tag}-{}-{}", std::process::id(), fastrand::u32(..));
    let mut config = pg_config();
    config.application_name(&name);
    (config, name)
}

/// A plain connection for the test's own queries.
async fn admin() -> tokio_postgres::Client {
    let config = pg_config();
    let (client, conn) = tokio::time::timeout(Duration::from_secs(10), config.connect(NoTls))
        .await
        .expect("PostgreSQL answers in time (is MARINA_PG_URL's server running?)")
        .unwrap_or_else(|e| panic!("PostgreSQL at {config:?} is not reachable: {e}"));
    tokio::spawn(conn);
    client
}

async fn sessions(admin: &tokio_postgres::Client, name: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

/// Terminates every session named `name` and waits (at most 10 s) until the server has
/// ended them.
async fn terminate(admin: &tokio_postgres::Client, name: &str) -> usize {
    let killed = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .len();
    for _ in 0..500 {
        if sessions(admin, name).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sessions(admin, name).await, 0, "the sessions ended");
    // The clients' connection tasks read the server's goodbye.
    tokio::time::sleep(Duration::from_millis(200)).await;
    killed
}

fn pool(config: Config, max_size: usize) -> PgPool {
    Pool::builder()
        .max_size(max_size)
        .acquire_timeout(Duration::from_secs(20))
        .health_check_interval(None)
        .build(Managed::new(PgConnector::new(NoTls)), config)
        .expect("a valid pool")
}

async fn select_one(client: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    Ok(client.query_one("SELECT 1", &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_whose_sessions_were_terminated_are_replaced_at_checkout() {
    const N: usize = 16;
    tokio::time::timeout(Duration::from_secs(60), async {
        let admin = admin().await;
        let (config, name) = tagged("terminate");
        let pool = pool(config, N);

        // N clients, all checked out at once, then idle.
        let mut held = Vec::new();
        for _ in 0..N {
            let c = pool.get().await.expect("connect");
            assert_eq!(select_one(&c).await.unwrap(), 1);
            held.push(c);
        }
        let pids: Vec<i32> = {
            let mut pids = Vec::new();
            for c in &held {
                pids.push(
                    c.query_one("SELECT pg_backend_pid()", &[])
                        .await
                        .unwrap()
                        .get(0),
                );
            }
            pids
        };
        drop(held);
        assert_eq!(sessions(&admin, &name).await, N as i64);

        assert_eq!(terminate(&admin, &name).await, N);

        // The next checkouts all get live clients on new sessions.
        let mut held = Vec::new();
        for _ in 0..N {
            let c = pool.get().await.expect("a live client");
            let pid: i32 = c
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .expect("the client is live")
                .get(0);
            assert!(!pids.contains(&pid), "a new session");
            held.push(c);
        }
        let s = pool.stats();
        println!("{s:#?}");
        assert_eq!(
            s.destroyed, N as u64,
            "the dead clients were counted: {s:#?}"
        );
        assert_eq!((s.created, s.total), (2 * N as u64, N), "{s:#?}");
        drop(held);
        pool.close().await;
    })
    .await
    .expect("the test ran within 60 s");
}

/// A TCP proxy on 127.0.0.1 in front of the server that can stage a restart: drop
/// every connection and refuse new ones for a while.
struct Proxy {
    addr: SocketAddr,
    restart: tokio::sync::mpsc::Sender<Duration>,
    task: tokio::task::JoinHandle<()>,
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let mut listener = listen(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        let (restart, mut restarts) = tokio::sync::mpsc::channel::<Duration>(1);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut client, _)) = accepted else { continue };
                        conns.spawn(async move {
                            if let Ok(mut server) = TcpStream::connect(upstream).await {
                                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            }
                        });
                    }
                    down = restarts.recv() => {
                        let Some(down) = down else { return };
                        // Down: refuse connects (no listener) and drop every connection.
                        drop(listener);
                        conns.abort_all();
                        while conns.join_next().await.is_some() {}
                        tokio::time::sleep(down).await;
                        listener = loop {
                            match listen(addr) {
                                Ok(l) => break l,
                                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                            }
                        };
                    }
                }
            }
        });
        Proxy {
            addr,
            restart,
            task,
        }
    }
}

/// The server's TCP address, from the configuration.
fn server_addr(config: &Config) -> SocketAddr {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        other => panic!("MARINA_PG_URL must name a TCP host for the proxy test, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .expect("resolve the PostgreSQL host")
        .next()
        .expect("an address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_16_busy_tasks_costs_checkouts_no_errors() {
    const TASKS: usize = 16;
    tokio::time::timeout(Duration::from_secs(60), async {
        let base = pg_config();
        let proxy = Proxy::start(server_addr(&base)).await;
        let (mut config, _name) = tagged("restart");
        config.host("127.0.0.1").port(proxy.addr.port());
        let pool: PgPool = Pool::builder()
            .max_size(TASKS)
            .min_idle(TASKS)
            .acquire_timeout(Duration::from_secs(10)) // outlasts the 0.3 s outage
            .connect_timeout(Duration::from_secs(2))
            .health_check_interval(None)
            .build(Managed::new(PgConnector::new(NoTls)), config)
            .unwrap();
        pool.ready_min().await.expect("warm");

        let stop = Arc::new(AtomicBool::new(false));
        let restarted = Arc::new(AtomicBool::new(false));
        let (get_errors, query_errors, ok_after) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = Vec::new();
        for _ in 0..TASKS {
            let (pool, stop, restarted) = (pool.clone(), stop.clone(), restarted.clone());
            let (get_errors, query_errors, ok_after) =
                (get_errors.clone(), query_errors.clone(), ok_after.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(SeqCst) {
                    let mut client = match pool.get().await {
                        Ok(c) => c,
                        Err(e) => {
                            eprintln!("checkout failed: {e:?}");
                            get_errors.fetch_add(1, SeqCst);
                            continue;
                        }
                    };
                    match select_one(&client).await {
                        Ok(1) if restarted.load(SeqCst) => {
                            ok_after.fetch_add(1, SeqCst);
                        }
                        Ok(_) => {}
                        // The query was on a connection the restart cut: that one is
                        // lost whatever the pool does; the client is not reused.
                        Err(_) => {
                            client.mark_broken();
                            query_errors.fetch_add(1, SeqCst);
                        }
                    }
                }
            }));
        }

        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = pool.stats();
        proxy.restart.send(Duration::from_millis(300)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        restarted.store(true, SeqCst);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stop.store(true, SeqCst);
        for t in tasks {
            t.await.expect("a task panicked");
        }

        let s = pool.stats();
        println!(
            "before: {before:#?}\nafter: {s:#?}\ncheckout errors {}, query errors {}, queries after the restart {}",
            get_errors.load(SeqCst),
            query_errors.load(SeqCst),
            ok_after.load(SeqCst)
        );
        assert_eq!(get_errors.load(SeqCst), 0, "no checkout failed");
        assert!(ok_after.load(SeqCst) >= TASKS as u64, "queries ran after the restart");
        assert!(s.destroyed >= TASKS as u64, "every cut client was closed: {s:#?}");
        assert!(s.failed > 0, "connects were refused during the outage, and retried: {s:#?}");
        assert_eq!(s.timed_out, 0, "{s:#?}");
        pool.close().await;
        proxy.task.abort();
    })
    .await
    .expect("the test ran within 60 s");
}

/// A connect the server refuses for good comes back at once (the server's error, not
/// a timeout), even with retries always on and a 60 s acquire timeout.
async fn fails_at_once(config: Config, code: &SqlState, text: &str) {
    let pool: PgPool = Pool::builder()
        .acquire_timeout(Duration::from_secs(60))
        .connect_retry(ConnectRetry::Always)
        .health_check_interval(None)
        .build(Managed::new(PgConnector::new(NoTls)), config)
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), pool.get())
        .await
        .expect("returned at once, not retried until the acquire timeout")
        .expect_err("the server refuses it");
    assert!(err.is_connect(), "{err:?}");
    let pg = err
        .source()
        .and_then(|s| s.downcast_ref::<tokio_postgres::Error>())
        .unwrap_or_else(|| panic!("the server's error is the source: {err:?}"));
    assert_eq!(pg.code(), Some(code), "{pg:?}");
    let message = pg.as_db_error().expect("a server error").message();
    assert!(message.contains(text), "{message}");
    assert_eq!(pool.stats().failed, 1, "tried once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_database_fails_at_once_with_the_servers_message() {
    let mut config = pg_config();
    config.dbname("marina_does_not_exist");
    fails_at_once(
        config,
        &SqlState::INVALID_CATALOG_NAME,
        "marina_does_not_exist",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_fails_at_once_with_the_servers_message() {
    let mut config = pg_config();
    config.user("marina_no_such_user");
    fails_at_once(
        config,
        &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        "marina_no_such_user",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_on_checkout_runs_a_query_before_reuse() {
    let admin = admin().await;
    let (config, name) = tagged("ping");
    let pool: PgPool = Pool::builder()
        .max_size(1)
        .health_check_interval(None)
        .build(
            Managed::new(PgConnector::new(NoTls).ping_on_checkout(true)),
            config,
        )
        .unwrap();
    let c = pool.get().await.unwrap();
    assert_eq!(select_one(&c).await.unwrap(), 1);
    drop(c);
    terminate(&admin, &name).await;
    let c = pool.get().await.expect("a live client");
    assert_eq!(select_one(&c).await.unwrap(), 1);
    assert_eq!(pool.stats().destroyed, 1);
}
