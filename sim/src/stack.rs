//! The marina stack over turmoil's TCP: the stack unchanged, its connector turmoil's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use marina::core::{BoxError, BoxFuture, Request};
use marina::health::{ActiveConfig, HealthConfig};
use marina::pool::Config;
use marina::{AffinityMode, KeyFnBox, Stack, StackHandle, StackService};
use tower_service::Service;

use crate::log::Log;
use crate::request;
use crate::scenario::Scenario;
use crate::stream::SimStream;

/// The stack's connector: turmoil's TCP, each stream recording the request lines
/// written through it.
#[derive(Clone)]
pub(crate) struct SimConnector {
    addrs: Arc<Vec<SocketAddr>>,
    log: Log,
}

impl SimConnector {
    /// A connector to the backends at `addrs` (their index is their position).
    pub(crate) fn new(addrs: Vec<SocketAddr>, log: Log) -> Self {
        SimConnector {
            addrs: Arc::new(addrs),
            log,
        }
    }
}

impl Service<SocketAddr> for SimConnector {
    type Response = SimStream;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, std::io::Result<SimStream>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, addr: SocketAddr) -> Self::Future {
        let backend = self
            .addrs
            .iter()
            .position(|a| *a == addr)
            .unwrap_or(usize::MAX);
        let log = self.log.clone();
        Box::pin(SimStream::connect(addr, backend, log))
    }
}

/// The active health check: a `ping` line through the same connector, its echo back.
#[derive(Clone)]
struct SimProbe(SimConnector);

impl marina::core::Probe<SocketAddr> for SimProbe {
    fn probe<'a>(&'a self, addr: &'a mut SocketAddr) -> BoxFuture<'a, Result<Duration, BoxError>> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let mut connector = self.0.clone();
        let addr = *addr;
        Box::pin(async move {
            let start = tokio::time::Instant::now();
            let mut s = connector.call(addr).await?;
            s.write_all(b"ping\n").await?;
            let mut reply = String::new();
            BufReader::new(s).read_line(&mut reply).await?;
            if !reply.starts_with("ping @b") {
                return Err(format!("probe: unexpected reply {reply:?}").into());
            }
            Ok(start.elapsed())
        })
    }
}

/// Builds the stack for `s` over backends `all[..s.initial]`.
pub(crate) fn build(
    s: &Scenario,
    all: &[SocketAddr],
    log: &Log,
) -> Result<(StackService<String, String>, StackHandle), BoxError> {
    let key = KeyFnBox::new(|r: &Request<String>| request::parse_key(&r.body).map(str::to_owned));
    let session =
        KeyFnBox::new(|r: &Request<String>| request::parse_session(&r.body).map(str::to_owned));
    let health = HealthConfig {
        consecutive_failures: 3,
        base_ejection: Duration::from_secs(1),
        max_ejection: Duration::from_secs(4),
        reset_after: Duration::from_secs(10),
        ..HealthConfig::default()
    };
    let pool = Config {
        min_idle: 1,
        max_size: 4,
        acquire_timeout: Some(Duration::from_millis(400)),
        idle_timeout: Some(Duration::from_secs(5)),
        health_check_interval: Some(Duration::from_secs(1)),
        health_check_timeout: Duration::from_millis(200),
        eviction_interval: Duration::from_secs(1),
        ..Config::balanced()
    };
    let connector = SimConnector::new(all.to_vec(), log.clone());
    let mut b = Stack::builder::<String>()
        .endpoints(all[..s.initial].iter().copied())
        .connector(connector.clone())
        .connect_timeout(Duration::from_millis(300))
        .request_timeout(s.request_timeout)
        .deadline(s.deadline)
        .failfast_timeout(s.failfast)
        .health(Some(health))
        .pool(pool);
    if let Some(h) = s.hedge {
        b = b.hedge(h);
    }
    if s.probe {
        let active = ActiveConfig {
            interval: Duration::from_millis(250),
            timeout: Duration::from_millis(200),
            ..ActiveConfig::default()
        };
        b = b.probe(active, SimProbe(connector));
    }
    if s.sessions {
        b = b.affinity(AffinityMode::Sticky(session, Default::default()));
    }
    if let Some(limit) = s.concurrency {
        b = b.concurrency_per_key(key, limit);
    }
    b.build_line()
}
