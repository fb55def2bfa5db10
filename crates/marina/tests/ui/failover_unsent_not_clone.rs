// `failover_unsent` needs no Clone request: this compiles.
use marina::balance::{Balance, Failover, RoundRobin};

struct Upload(Vec<u8>);

fn main() {
    let endpoints = vec![tower::service_fn(|u: Upload| async move {
        Ok::<_, std::io::Error>(u.0.len())
    })];
    let _lb = Balance::from_services(endpoints, RoundRobin::new()).failover_unsent(Failover::new());
}
