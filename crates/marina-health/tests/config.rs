//! Settings out of range are refused with every problem and its path: by
//! `HealthConfig::validate` / `ActiveConfig::validate`, by the `try_` constructors as an
//! `InvalidHealthConfig`, and by the plain constructors as a panic with the same message.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use marina_core::{BoxError, probe_fn};
use marina_health::{
    ActiveConfig, FailureRate, Health, HealthConfig, HealthLayer, InvalidHealthConfig,
    TcpConnectProbe,
};
use tower::service_fn;
use tower::{Layer, Service};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn with_rate(threshold: f64) -> HealthConfig {
    HealthConfig {
        failure_rate: Some(FailureRate {
            threshold,
            ..FailureRate::default()
        }),
        ..HealthConfig::default()
    }
}

/// The only problem of `result`: its path and message.
fn only_problem(result: Result<(), InvalidHealthConfig>) -> (String, String) {
    let err = result.expect_err("the configuration is refused");
    assert_eq!(err.problems.len(), 1, "{err}");
    let p = &err.problems[0];
    (p.path.clone(), p.message.clone())
}

fn addr() -> std::net::SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}

fn backend() -> impl Service<u32, Response = u32, Error = std::io::Error> + Clone + std::fmt::Debug
{
    service_fn(|req: u32| async move { Ok::<_, std::io::Error>(req) })
}

#[test]
fn the_defaults_are_valid() {
    assert_eq!(HealthConfig::default().validate(), Ok(()));
    assert_eq!(ActiveConfig::default().validate(), Ok(()));
    let no_detectors = HealthConfig {
        consecutive_failures: 0,
        failure_rate: None,
        ..HealthConfig::default()
    };
    assert_eq!(no_detectors.validate(), Ok(()));
}

#[test]
fn a_failure_rate_written_as_a_percentage_is_refused() {
    let (path, message) = only_problem(with_rate(50.0).validate());
    assert_eq!(path, "failure_rate.threshold");
    assert_eq!(
        message,
        "must be within 0.0..1.0 (a share, not a percentage), got 50.0"
    );
}

#[test]
fn a_failure_rate_that_cannot_be_exceeded_or_is_no_number_is_refused() {
    let (path, message) = only_problem(with_rate(1.0).validate());
    assert_eq!(path, "failure_rate.threshold");
    assert!(message.contains("never eject"), "{message}");
    assert!(message.contains("None"), "{message}");

    let (path, message) = only_problem(with_rate(f64::NAN).validate());
    assert_eq!(path, "failure_rate.threshold");
    assert!(message.ends_with("got NaN"), "{message}");

    let (_, message) = only_problem(with_rate(-0.5).validate());
    assert!(message.ends_with("got -0.5"), "{message}");
    let (_, message) = only_problem(with_rate(f64::INFINITY).validate());
    assert!(message.ends_with("got inf"), "{message}");

    // The edges of the range.
    assert_eq!(with_rate(0.0).validate(), Ok(()));
    assert_eq!(with_rate(0.99).validate(), Ok(()));
}

#[test]
fn a_bad_failure_rate_is_ignored_when_the_detector_is_off() {
    let off = HealthConfig {
        failure_rate: None,
        ..with_rate(50.0)
    };
    assert_eq!(off.validate(), Ok(()));
}

#[test]
fn an_empty_or_tiny_failure_window_is_refused() {
    let config = |min_requests, window| HealthConfig {
        failure_rate: Some(FailureRate {
            min_requests,
            window,
            ..FailureRate::default()
        }),
        ..HealthConfig::default()
    };
    assert_eq!(
        only_problem(config(0, secs(10)).validate()),
        (
            "failure_rate.min_requests".to_string(),
            "must be at least 1 (the rate of an empty window means nothing)".to_string()
        )
    );
    let (path, message) = only_problem(config(20, Duration::ZERO).validate());
    assert_eq!(path, "failure_rate.window");
    assert_eq!(
        message,
        "must be at least 10ms (10 buckets of 1ms), got 0ns"
    );
    assert!(config(20, ms(9)).validate().is_err());
    assert_eq!(config(1, ms(10)).validate(), Ok(()));
}

#[test]
fn a_base_ejection_above_the_max_is_refused() {
    let config = HealthConfig {
        base_ejection: secs(30),
        max_ejection: secs(10),
        ..HealthConfig::default()
    };
    assert_eq!(
        only_problem(config.validate()),
        (
            "base_ejection".to_string(),
            "30s is above max_ejection (10s)".to_string()
        )
    );
    let equal = HealthConfig {
        base_ejection: secs(10),
        max_ejection: secs(10),
        ..HealthConfig::default()
    };
    assert_eq!(equal.validate(), Ok(()));
}

#[test]
fn a_zero_or_endless_ejection_is_refused() {
    let zero = HealthConfig {
        base_ejection: Duration::ZERO,
        ..HealthConfig::default()
    };
    assert_eq!(
        only_problem(zero.validate()),
        ("base_ejection".to_string(), "must be above 0".to_string())
    );
    // `Duration::MAX` would overflow the clock when an ejection starts.
    let endless = HealthConfig {
        max_ejection: Duration::MAX,
        ..HealthConfig::default()
    };
    let (path, message) = only_problem(endless.validate());
    assert_eq!(path, "max_ejection");
    assert!(message.starts_with("must be at most 1 day"), "{message}");
    let a_day = HealthConfig {
        max_ejection: secs(24 * 3600),
        ..HealthConfig::default()
    };
    assert_eq!(a_day.validate(), Ok(()));
}

#[test]
fn probe_round_checks_out_of_range_are_refused() {
    let slow = HealthConfig {
        response_time_threshold: Duration::ZERO,
        ..HealthConfig::default()
    };
    assert_eq!(
        only_problem(slow.validate()).0,
        "response_time_threshold".to_string()
    );
    for bad in [10.0, -0.1, f64::NAN] {
        let config = HealthConfig {
            error_rate_threshold: bad,
            ..HealthConfig::default()
        };
        let (path, message) = only_problem(config.validate());
        assert_eq!(path, "error_rate_threshold");
        assert!(message.contains("a share, not a percentage"), "{message}");
    }
    // 1.0 is a valid choice here: never degraded by probe errors.
    let never = HealthConfig {
        error_rate_threshold: 1.0,
        ..HealthConfig::default()
    };
    assert_eq!(never.validate(), Ok(()));
    let no_history = HealthConfig {
        history: 0,
        ..HealthConfig::default()
    };
    assert_eq!(only_problem(no_history.validate()).0, "history".to_string());
}

#[test]
fn every_problem_is_listed_in_field_order() {
    let config = HealthConfig {
        failure_rate: Some(FailureRate {
            threshold: 50.0,
            min_requests: 0,
            window: Duration::ZERO,
        }),
        base_ejection: secs(600),
        history: 0,
        ..HealthConfig::default()
    };
    let err = config.validate().unwrap_err();
    let paths: Vec<_> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "failure_rate.threshold",
            "failure_rate.min_requests",
            "failure_rate.window",
            "base_ejection",
            "history"
        ]
    );
    let text = err.to_string();
    assert!(text.starts_with("invalid health configuration:\n  failure_rate.threshold: "));
    assert_eq!(text.lines().count(), 6, "{text}");
    assert!(text.contains("\n  base_ejection: 600s is above max_ejection (300s)"));
    // A plain error, for `?` into a `BoxError`.
    let boxed: BoxError = err.into();
    assert!(boxed.downcast_ref::<InvalidHealthConfig>().is_some());
}

#[test]
fn a_zero_probe_interval_is_refused() {
    let zero = ActiveConfig {
        interval: Duration::ZERO,
        ..ActiveConfig::default()
    };
    assert_eq!(
        only_problem(zero.validate()),
        (
            "interval".to_string(),
            "must be at least 10ms, got 0ns".to_string()
        )
    );
    let fast = ActiveConfig {
        interval: ms(9),
        ..ActiveConfig::default()
    };
    assert!(fast.validate().is_err());
    let fastest = ActiveConfig {
        interval: ms(10),
        ..ActiveConfig::default()
    };
    assert_eq!(fastest.validate(), Ok(()));
}

#[test]
fn out_of_range_jitter_is_refused() {
    for bad in [0.6, 10.0, -0.1, f64::NAN] {
        let config = ActiveConfig {
            jitter: bad,
            ..ActiveConfig::default()
        };
        let (path, message) = only_problem(config.validate());
        assert_eq!(path, "jitter");
        assert!(message.starts_with("must be within 0.0..=0.5"), "{message}");
    }
    for good in [0.0, 0.5] {
        let config = ActiveConfig {
            jitter: good,
            ..ActiveConfig::default()
        };
        assert_eq!(config.validate(), Ok(()));
    }
}

#[test]
fn zero_probe_thresholds_and_timeout_are_refused() {
    let config = ActiveConfig {
        timeout: Duration::ZERO,
        healthy_threshold: 0,
        unhealthy_threshold: 0,
        ..ActiveConfig::default()
    };
    let err = config.validate().unwrap_err();
    let problems: Vec<_> = err.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        problems,
        [
            "timeout: must be above 0",
            "healthy_threshold: must be at least 1",
            "unhealthy_threshold: must be at least 1"
        ]
    );
}

#[test]
fn try_new_refuses_what_validate_refuses() {
    let err = HealthLayer::try_new(with_rate(50.0)).unwrap_err();
    assert!(err.has("failure_rate.threshold"));
    assert_eq!(err, with_rate(50.0).validate().unwrap_err());
    assert!(HealthLayer::try_new(HealthConfig::default()).is_ok());

    let err = Health::try_new(backend(), with_rate(f64::NAN)).unwrap_err();
    assert!(err.has("failure_rate.threshold"));
    assert!(Health::try_new(backend(), HealthConfig::default()).is_ok());
}

#[test]
#[should_panic(
    expected = "invalid health configuration:\n  failure_rate.threshold: must be within 0.0..1.0 (a share, not a percentage), got 50.0"
)]
fn health_layer_new_panics_with_the_problems() {
    let _ = HealthLayer::new(with_rate(50.0));
}

#[test]
#[should_panic(expected = "base_ejection: 30s is above max_ejection (10s)")]
fn health_new_panics_with_the_problems() {
    let config = HealthConfig {
        max_ejection: secs(10),
        ..HealthConfig::default()
    };
    let _ = Health::new(backend(), config);
}

#[tokio::test]
async fn try_probe_names_active_settings_under_active() {
    let zero = ActiveConfig {
        interval: Duration::ZERO,
        ..ActiveConfig::default()
    };
    let err = HealthLayer::new(HealthConfig::default())
        .try_probe(zero, TcpConnectProbe, addr())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid health configuration:\n  active.interval: must be at least 10ms, got 0ns"
    );
}

#[tokio::test]
#[should_panic(expected = "active.unhealthy_threshold: must be at least 1")]
async fn probe_panics_with_the_problems() {
    let zero = ActiveConfig {
        unhealthy_threshold: 0,
        ..ActiveConfig::default()
    };
    let _ = HealthLayer::new(HealthConfig::default()).probe(zero, TcpConnectProbe, addr());
}

#[tokio::test]
async fn try_build_lists_both_configurations_problems() {
    let err = Health::builder(backend())
        .config(with_rate(50.0))
        .probe(
            ActiveConfig {
                interval: Duration::ZERO,
                jitter: 10.0,
                ..ActiveConfig::default()
            },
            TcpConnectProbe,
            addr(),
        )
        .try_build()
        .unwrap_err();
    let paths: Vec<_> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["failure_rate.threshold", "active.interval", "active.jitter"]
    );
}

#[tokio::test]
#[should_panic(expected = "active.interval: must be at least 10ms, got 0ns")]
async fn build_panics_with_the_problems() {
    let _ = Health::builder(backend())
        .probe(
            ActiveConfig {
                interval: Duration::ZERO,
                ..ActiveConfig::default()
            },
            TcpConnectProbe,
            addr(),
        )
        .build();
}

/// A probe that counts its rounds.
fn counting_probe(rounds: Arc<AtomicUsize>) -> impl marina_core::Probe<()> {
    probe_fn(move |_: &mut ()| {
        rounds.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    })
}

#[tokio::test(start_paused = true)]
async fn a_refused_configuration_starts_no_prober() {
    let zero = ActiveConfig {
        interval: Duration::ZERO,
        ..ActiveConfig::default()
    };
    let rounds = Arc::new(AtomicUsize::new(0));
    let refused = Health::builder(backend())
        .probe(zero, counting_probe(rounds.clone()), ())
        .try_build();
    assert!(refused.is_err());
    tokio::time::sleep(secs(1)).await;
    assert_eq!(rounds.load(Ordering::SeqCst), 0);

    // The same probe with a valid interval does run (so the count above could move).
    let ok = ActiveConfig {
        interval: ms(10),
        ..ActiveConfig::default()
    };
    let layer = HealthLayer::new(HealthConfig::default())
        .try_probe(ok, counting_probe(rounds.clone()), ())
        .unwrap();
    let _svc = layer.layer(backend());
    tokio::time::sleep(secs(1)).await;
    assert!(rounds.load(Ordering::SeqCst) > 1);
}
