//! The client host: the system under test (the marina stack, or a bare baseline client)
//! driven by concurrent clients, a discovery task and a health monitor.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marina::StackHandle;
use marina::core::{BoxError, Idempotent, Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Service, ServiceExt};

use crate::backend::{PORT, host_name, reply_for};
use crate::log::{Event, Log};
use crate::scenario::{Fault, Scenario};
use crate::stream::SimStream;
use crate::{Backends, request};

/// The service the clients call.
pub type Svc = BoxCloneService<Request<String>, Response<String>, BoxError>;

/// What runs on the client host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The marina stack (`Stack::builder().connector(…)`) over turmoil's TCP.
    Stack,
    /// A bare client: a connection per request, round robin, one attempt with the
    /// request timeout. A baseline for the harness itself (no health checks, no
    /// failover, no sessions, no limits).
    Direct,
}

/// The service and, for the stack, its handle.
pub struct Built {
    /// What the clients call.
    pub svc: Svc,
    /// The stack's handle (`None` for [`Target::Direct`]).
    pub handle: Option<StackHandle>,
    /// Adds or removes a backend by discovery (the baseline's own list).
    direct: Option<DirectList>,
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built").finish_non_exhaustive()
    }
}

/// The backends' addresses, in index order.
pub fn addresses(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| SocketAddr::new(turmoil::lookup(host_name(i)), PORT))
        .collect()
}

type DirectList = Arc<Mutex<Vec<(SocketAddr, usize)>>>;

/// The baseline client's service.
#[derive(Clone)]
struct Direct {
    list: DirectList,
    next: Arc<AtomicUsize>,
    log: Log,
    timeout: Duration,
}

impl Service<Request<String>> for Direct {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = marina::core::BoxFuture<'static, Result<Response<String>, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<String>) -> Self::Future {
        let picked = {
            let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
            (!list.is_empty()).then(|| list[self.next.fetch_add(1, Relaxed) % list.len()])
        };
        let log = self.log.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let (addr, backend) = picked.ok_or("no backends")?;
            let exchange = async {
                let mut s = SimStream::connect(addr, backend, log).await?;
                s.write_all(format!("{}\n", req.body).as_bytes()).await?;
                let mut reply = String::new();
                BufReader::new(s).read_line(&mut reply).await?;
                if !reply.ends_with('\n') {
                    return Err::<_, BoxError>("connection closed before the reply".into());
                }
                reply.pop();
                Ok(Response::new(reply))
            };
            tokio::time::timeout(timeout, exchange)
                .await
                .map_err(|_| BoxError::from(format!("no reply within {timeout:?}")))?
        })
    }
}

impl Target {
    /// Builds the target over backends `initial` of `all`.
    pub fn build(self, s: &Scenario, all: &[SocketAddr], log: &Log) -> Result<Built, BoxError> {
        match self {
            Target::Direct => {
                let list: DirectList = Arc::new(Mutex::new(
                    all[..s.initial].iter().copied().zip(0..).collect(),
                ));
                Ok(Built {
                    svc: BoxCloneService::new(Direct {
                        list: list.clone(),
                        next: Arc::new(AtomicUsize::new(0)),
                        log: log.clone(),
                        timeout: s.request_timeout,
                    }),
                    handle: None,
                    direct: Some(list),
                })
            }
            Target::Stack => {
                let (svc, handle) = crate::stack::build(s, all, log)?;
                Ok(Built {
                    svc: BoxCloneService::new(svc),
                    handle: Some(handle),
                    direct: None,
                })
            }
        }
    }
}

/// The caller gave up on a request (dropped its future).
#[derive(Debug)]
struct GaveUp;

impl std::fmt::Display for GaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the caller gave up (future dropped)")
    }
}

impl std::error::Error for GaveUp {}

/// The error's text and its sources', for the log.
fn error_text(e: &BoxError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// One client: its requests one after another, each outcome logged.
async fn client(c: usize, s: Scenario, mut svc: Svc, log: Log, seed: u64) {
    // Each client's own jitter, from the seed (the stack's pickers draw from
    // fastrand's thread-local generator: this one is separate).
    let mut rng = fastrand::Rng::with_seed(seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    tokio::time::sleep(Duration::from_millis(rng.u64(0..100))).await;
    let key = format!("u{}", c % s.keys.max(1));
    let session = format!("s{}", c % s.sessions_count());
    for n in 0..s.requests {
        let id = (c as u64 + 1) * 100_000 + n as u64;
        let idempotent = s.idempotent_every > 0 && n % s.idempotent_every == 0;
        let line = request::line(id, &key, &session, idempotent);
        log.push(Event::Issued {
            id,
            client: c,
            key: key.clone(),
            session: session.clone(),
            idempotent,
        });
        let mut req = Request::new(line.clone());
        if idempotent {
            Idempotent::mark(&mut req);
        }
        let start = Instant::now();
        // A caller that gives up drops the request's future at this time.
        let give_up = s
            .cancel_after
            .map(|(lo, hi)| start + Duration::from_millis(rng.u64(lo..=hi)));
        let mut called = None;
        let exchange = async {
            let svc = svc.ready().await?;
            called = Some(Instant::now());
            svc.call(req).await
        };
        let result = match give_up {
            Some(at) => match tokio::time::timeout_at(at, exchange).await {
                Ok(r) => r,
                Err(_) => Err(BoxError::from(GaveUp)),
            },
            None => exchange.await,
        };
        let (waited, took) = match called {
            Some(c) => (c - start, c.elapsed()),
            None => (start.elapsed(), Duration::ZERO),
        };
        let result = match result {
            Ok(reply) => {
                let body = reply.into_body();
                let from = body
                    .rsplit_once(" @b")
                    .and_then(|(_, b)| b.parse::<usize>().ok())
                    .filter(|&b| body == reply_for(&line, b));
                match from {
                    Some(b) => Ok(b),
                    None => {
                        log.push(Event::WrongReply {
                            id,
                            reply: body.clone(),
                        });
                        Err(format!("wrong reply {body:?}"))
                    }
                }
            }
            Err(e) => Err(error_text(&e)),
        };
        log.push(Event::Outcome {
            id,
            result,
            waited,
            took,
        });
        let jitter = rng.u64(0..=s.think.as_millis() as u64 / 2);
        tokio::time::sleep(s.think + Duration::from_millis(jitter)).await;
    }
}

/// Reads the stack's health view every [`MONITOR_EVERY`](crate::check::MONITOR_EVERY)
/// and logs ejections, readmissions and panic mode.
async fn monitor(handle: StackHandle, all: Vec<SocketAddr>, log: Log, done: Arc<AtomicBool>) {
    let mut ejected = vec![false; all.len()];
    let mut panicking = false;
    while !done.load(Relaxed) {
        for (i, addr) in all.iter().enumerate() {
            let now = handle.health(*addr).is_some_and(|h| !h.status().is_ready());
            if now != ejected[i] {
                ejected[i] = now;
                log.push(Event::Ejected {
                    backend: i,
                    ejected: now,
                });
            }
        }
        let p = handle.stats().balance.panicking;
        if p != panicking {
            panicking = p;
            log.push(Event::Panic(p));
        }
        tokio::time::sleep(crate::check::MONITOR_EVERY).await;
    }
}

/// The client host's software.
pub async fn host(
    s: Scenario,
    target: Target,
    log: Log,
    backends: Backends,
    seed: u64,
) -> turmoil::Result {
    let start = Instant::now();
    let all = addresses(s.backends);
    let built = match target.build(&s, &all, &log) {
        Ok(b) => b,
        Err(e) => {
            log.push(Event::HostError(format!("build: {}", error_text(&e))));
            return Err(e);
        }
    };
    let done = Arc::new(AtomicBool::new(false));
    let monitor = built
        .handle
        .clone()
        .map(|h| tokio::task::spawn_local(monitor(h, all.clone(), log.clone(), done.clone())));
    // Discovery: the scenario's adds and removes, at their times.
    let discovery = {
        let steps: Vec<_> = s
            .sorted_faults()
            .into_iter()
            .filter(|(_, f)| f.is_discovery())
            .collect();
        let handle = built.handle.clone();
        let direct = built.direct.clone();
        let (log, all) = (log.clone(), all.clone());
        tokio::task::spawn_local(async move {
            for (at, f) in steps {
                tokio::time::sleep_until(start + at).await;
                let (i, added) = match f {
                    Fault::Add(i) => (i, true),
                    Fault::Remove(i) => (i, false),
                    _ => continue,
                };
                if let Some(h) = &handle {
                    if added {
                        if let Err(e) = h.add_endpoint(all[i]) {
                            log.push(Event::HostError(format!("add b{i}: {e}")));
                        }
                    } else if !h.remove_endpoint(all[i]) {
                        log.push(Event::HostError(format!("remove b{i}: not in the stack")));
                    }
                }
                if let Some(d) = &direct {
                    let mut list = d.lock().unwrap_or_else(|e| e.into_inner());
                    list.retain(|(_, b)| *b != i);
                    if added {
                        list.push((all[i], i));
                    }
                }
                log.push(Event::Discovery { backend: i, added });
            }
        })
    };
    let clients: Vec<_> = (0..s.clients)
        .map(|c| {
            tokio::task::spawn_local(client(c, s.clone(), built.svc.clone(), log.clone(), seed))
        })
        .collect();
    for c in clients {
        c.await?;
    }
    discovery.await?;
    done.store(true, Relaxed);
    if let Some(m) = monitor {
        m.await?;
    }
    drop(built.svc);
    match &built.handle {
        Some(h) => {
            let left = h.shutdown(Duration::from_secs(2)).await;
            let pool_total = h.stats().backends.iter().map(|b| b.pool.total).sum();
            let t = h.stats().balance;
            log.push(Event::Note(format!(
                "balance: {} attempts, {} errors, {} failovers, {} hedges ({} won)",
                t.requests, t.errors, t.retries, t.hedges, t.hedges_won
            )));
            if let Some(a) = h.stats().affinity {
                log.push(Event::Sessions {
                    created: a.created,
                    repinned: a.repinned,
                });
            }
            log.push(Event::Shutdown { left, pool_total });
        }
        None => log.push(Event::Shutdown {
            left: 0,
            pool_total: 0,
        }),
    }
    drop(built.handle);
    // The connections' closes reach the backends.
    tokio::time::sleep(Duration::from_secs(2)).await;
    log.push(Event::ClientStreams {
        live: log.live_streams().load(Relaxed),
        sockets: turmoil::established_tcp_stream_count(),
    });
    for i in 0..s.backends {
        let open = backends.lock()[i].open.values().copied().collect();
        let established = turmoil::established_tcp_stream_count_on(host_name(i));
        log.push(Event::Leftover {
            backend: i,
            open,
            established,
        });
    }
    Ok(())
}
