//! `StackConfig::from_toml` + `validate()` on arbitrary text.
//!
//! Invariants:
//! - parsing, validating and formatting errors never panic;
//! - every problem names a path;
//! - `Stack::from_config` agrees with `validate()`: it fails with exactly the problems
//!   `validate()` lists, and succeeds when there are none;
//! - whatever validates builds: `build_line()` succeeds (no panic, no error) inside a
//!   tokio current-thread runtime that is never driven, so the tasks the stack spawns
//!   (pools, health checks) never run and nothing reaches the network;
//! - the builder's own `validate()` finds nothing in a configuration that validated.
//!
//! There is no serializer (`StackConfig` is `Deserialize` only), so no round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use marina::{Stack, StackConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match StackConfig::from_toml(text) {
        Ok(config) => config,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let problems = config.validate();
    for p in &problems {
        assert!(!p.path.is_empty(), "a problem without a path: {p:?}");
        let _ = p.to_string();
    }
    // Parsing is deterministic, and so is validation.
    assert_eq!(StackConfig::from_toml(text).ok().as_ref(), Some(&config));
    assert_eq!(config.validate(), problems);

    let builder = Stack::from_config::<String>(&config);
    if !problems.is_empty() {
        let err = builder.expect_err("a configuration with problems must not make a builder");
        assert_eq!(
            err.0, problems,
            "from_config reports other problems than validate()"
        );
        let _ = err.to_string();
        return;
    }
    let builder = match builder {
        Ok(b) => b,
        Err(e) => panic!("validate() found nothing, but from_config failed: {e}\n{text}"),
    };
    let again = builder.validate();
    assert!(
        again.is_empty(),
        "validate() found nothing, the builder's validate() found {again:?}\n{text}"
    );
    // Built on a runtime that is never driven: spawned tasks never run, no socket opens.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    {
        let _enter = rt.enter();
        match builder.build_line() {
            Ok((svc, handle)) => {
                let _ = format!("{handle:?}");
                drop(svc);
                drop(handle);
            }
            Err(e) => panic!("validate() found nothing, but the stack does not build: {e}\n{text}"),
        }
    }
    drop(rt);
});
