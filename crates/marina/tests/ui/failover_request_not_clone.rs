// `failover` copies each request: a request type that is not Clone is refused at the
// `failover` call, with the bound named; `failover_unsent` is the way for such types.
use marina::balance::{Balance, Failover, RoundRobin};

struct Upload(Vec<u8>);

fn main() {
    let endpoints = vec![tower::service_fn(|u: Upload| async move {
        Ok::<_, std::io::Error>(u.0.len())
    })];
    let _lb = Balance::from_services(endpoints, RoundRobin::new()).failover(Failover::new());
}
