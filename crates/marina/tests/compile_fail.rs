//! Error messages are API: the mistakes a new user makes get errors that name the
//! cause and point at the call that needs it (pinned with trybuild; regenerate the
//! `.stderr` files with `TRYBUILD=overwrite` after a toolchain change, and review them).

#[test]
fn compile_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/stack_request_not_clone.rs");
    t.compile_fail("tests/ui/failover_request_not_clone.rs");
    t.pass("tests/ui/failover_unsent_not_clone.rs");
}
