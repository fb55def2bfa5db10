// A request type that is not Clone: the error names the type, the reason (failover
// re-sends never-sent requests), and points at `build_line`, not at `endpoints`.
struct Cmd(String);

impl From<Cmd> for String {
    fn from(c: Cmd) -> String {
        c.0
    }
}

fn main() {
    let _ = marina::Stack::builder::<Cmd>()
        .endpoints(["127.0.0.1:7000".parse().unwrap()])
        .build_line();
}
