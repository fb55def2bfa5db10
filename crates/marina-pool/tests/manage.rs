//! `Manage` connectors: the connector's own liveness check and recycle run in every
//! pool of it, with no per-pool hook.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use marina_pool::{KeyedPool, Manage, Managed, Pool};
use tower::{Service, ServiceExt};

/// A client whose connection can "die" (a flag) and that counts its recycles.
struct Client {
    id: usize,
    dead: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Down;

impl fmt::Display for Down {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("down")
    }
}

impl std::error::Error for Down {}

#[derive(Default)]
struct Db {
    made: Arc<AtomicUsize>,
    recycles: Arc<AtomicUsize>,
    /// Recycle: 0 = nothing to do, 1 = succeed, 2 = fail, 3 = hang.
    recycle: Arc<AtomicUsize>,
    deaths: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>>,
}

impl Manage<&'static str> for Db {
    type Conn = Client;
    type Error = Down;

    async fn connect(&self, _: &&'static str) -> Result<Client, Down> {
        let dead = Arc::new(AtomicBool::new(false));
        self.deaths.lock().unwrap().push(dead.clone());
        Ok(Client {
            id: self.made.fetch_add(1, SeqCst),
            dead,
        })
    }

    fn is_broken(&self, c: &mut Client) -> bool {
        c.dead.load(SeqCst)
    }

    fn recycle(&self, _: &mut Client) -> Option<impl Future<Output = Result<(), Down>> + Send> {
        let mode = self.recycle.load(SeqCst);
        let recycles = self.recycles.clone();
        (mode != 0).then_some(async move {
            recycles.fetch_add(1, SeqCst);
            match mode {
                1 => Ok(()),
                2 => Err(Down),
                _ => std::future::pending().await,
            }
        })
    }
}

impl Db {
    fn kill_all(&self) {
        for d in self.deaths.lock().unwrap().iter() {
            d.store(true, SeqCst);
        }
    }
}

fn builder() -> marina_pool::Builder {
    Pool::builder()
        .max_size(4)
        .acquire_timeout(Duration::from_secs(30))
        .health_check_timeout(Duration::from_secs(1))
        .health_check_interval(None)
        .no_expiry()
}

#[tokio::test(start_paused = true)]
async fn dead_clients_are_closed_at_checkout_in_every_pool_of_the_connector() {
    let db = Db::default();
    let (made, deaths) = (
        db.made.clone(),
        Db {
            deaths: db.deaths.clone(),
            ..Db::default()
        },
    );
    let connector = Managed::new(db);
    let pool = builder().build(connector.clone(), "db").unwrap();
    let held: Vec<_> = [pool.get().await.unwrap(), pool.get().await.unwrap()].into();
    drop(held); // two idle clients
    deaths.kill_all(); // the server restarted
    let a = pool.get().await.unwrap();
    let b = pool.get().await.unwrap();
    assert!(
        !a.dead.load(SeqCst) && !b.dead.load(SeqCst),
        "live clients only"
    );
    assert_eq!((a.id, b.id), (2, 3));
    let s = pool.stats();
    assert_eq!((s.destroyed, s.created), (2, 4), "{s:#?}");
    drop((a, b));

    // A keyed pool of the same connector checks the same way.
    let mut keyed = KeyedPool::new(builder(), connector).unwrap();
    let c = keyed.ready().await.unwrap().call("other").await.unwrap();
    drop(c);
    deaths.kill_all();
    let c = keyed.ready().await.unwrap().call("other").await.unwrap();
    assert!(!c.dead.load(SeqCst));
    assert_eq!(made.load(SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn a_builder_check_runs_after_the_connectors() {
    let db = Db::default();
    let deaths = Db {
        deaths: db.deaths.clone(),
        ..Db::default()
    };
    let pool = builder()
        .check(|c: &mut Client| c.id != 0) // refuses the first client too
        .build(Managed::new(db), "db")
        .unwrap();
    drop(pool.get().await.unwrap()); // client 0, idle
    let c = pool.get().await.unwrap();
    assert_eq!(c.id, 1, "the builder's check closed client 0");
    drop(c);
    deaths.kill_all();
    assert_eq!(
        pool.get().await.unwrap().id,
        2,
        "the connector's check closed client 1"
    );
}

#[tokio::test(start_paused = true)]
async fn recycle_runs_on_reused_clients_and_a_failure_replaces_them() {
    let db = Db::default();
    let (recycle, recycles) = (db.recycle.clone(), db.recycles.clone());
    let pool = builder().build(Managed::new(db), "db").unwrap();
    recycle.store(1, SeqCst);
    drop(pool.get().await.unwrap());
    assert_eq!(recycles.load(SeqCst), 0, "not on a client just opened");
    let c = pool.get().await.unwrap();
    assert_eq!(
        (c.id, recycles.load(SeqCst)),
        (0, 1),
        "reused after a recycle"
    );
    drop(c);

    recycle.store(2, SeqCst);
    let c = pool.get().await.unwrap();
    assert_eq!(c.id, 1, "the client that failed its recycle was replaced");
    let s = pool.stats();
    assert_eq!((s.destroyed, s.acquired, s.released), (1, 3, 2), "{s:#?}");
    drop(c);

    // A recycle that hangs is cut at health_check_timeout and the client replaced.
    recycle.store(3, SeqCst);
    let c = pool.get().await.unwrap();
    assert_eq!(c.id, 2);
    drop(c);
    let s = pool.stats();
    assert_eq!(s.acquired, s.released, "{s:#?}");
    assert_eq!((s.total, s.destroyed), (1, 2), "{s:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_checkout_cancelled_during_recycle_closes_the_client() {
    let db = Db::default();
    let recycle = db.recycle.clone();
    let pool = builder().build(Managed::new(db), "db").unwrap();
    drop(pool.get().await.unwrap());
    recycle.store(3, SeqCst); // hangs
    let r = tokio::time::timeout(Duration::from_millis(100), pool.get()).await;
    assert!(r.is_err());
    let s = pool.stats();
    assert_eq!((s.total, s.active, s.destroyed), (0, 0, 1), "{s:#?}");
    assert_eq!(s.acquired, s.released, "{s:#?}");
}
