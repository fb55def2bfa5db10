//! Which outcomes count as failures.

use std::fmt;

/// Decides whether a completed request counts as a failure for the passive detectors.
///
/// [`ErrorsOnly`] (the default) counts every `Err`. Wrap a closure with
/// [`classify_fn`] to count some responses too (an HTTP 503, an error reply of a line
/// protocol); with the `http` feature, [`Http5xx`] counts HTTP 5xx responses.
pub trait Classify<Resp, E>: Send + Sync + 'static {
    /// True if this outcome is a failure.
    fn is_failure(&self, outcome: Result<&Resp, &E>) -> bool;
}

/// Counts every `Err` as a failure, every response as a success.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorsOnly;

impl<Resp, E> Classify<Resp, E> for ErrorsOnly {
    fn is_failure(&self, outcome: Result<&Resp, &E>) -> bool {
        outcome.is_err()
    }
}

/// A [`Classify`] from a closure; see [`classify_fn`].
#[derive(Clone, Copy)]
pub struct ClassifyFn<F>(F);

impl<F> fmt::Debug for ClassifyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClassifyFn")
    }
}

/// A classifier from a closure over the outcome.
///
/// ```
/// use marina_health::{Classify, classify_fn};
///
/// // A line protocol whose error replies start with "ERR".
/// let k = classify_fn(|outcome: Result<&String, &std::io::Error>| match outcome {
///     Ok(reply) => reply.starts_with("ERR"),
///     Err(_) => true,
/// });
/// assert!(k.is_failure(Ok(&"ERR busy".to_string())));
/// assert!(!k.is_failure(Ok(&"OK".to_string())));
/// ```
pub fn classify_fn<Resp, E, F>(f: F) -> ClassifyFn<F>
where
    F: Fn(Result<&Resp, &E>) -> bool + Send + Sync + 'static,
{
    ClassifyFn(f)
}

impl<Resp, E, F> Classify<Resp, E> for ClassifyFn<F>
where
    F: Fn(Result<&Resp, &E>) -> bool + Send + Sync + 'static,
{
    fn is_failure(&self, outcome: Result<&Resp, &E>) -> bool {
        (self.0)(outcome)
    }
}

/// Counts errors and HTTP 5xx responses as failures (feature `http`).
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Http5xx;

#[cfg(feature = "http")]
impl<B, E> Classify<http::Response<B>, E> for Http5xx {
    fn is_failure(&self, outcome: Result<&http::Response<B>, &E>) -> bool {
        match outcome {
            Ok(resp) => resp.status().is_server_error(),
            Err(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_only_counts_errors() {
        assert!(Classify::<u8, ()>::is_failure(&ErrorsOnly, Err(&())));
        assert!(!Classify::<u8, ()>::is_failure(&ErrorsOnly, Ok(&1)));
    }

    #[cfg(feature = "http")]
    #[test]
    fn http_5xx_counts_server_errors_only() {
        let resp = |code: u16| http::Response::builder().status(code).body(()).unwrap();
        let k = Http5xx;
        assert!(Classify::<_, ()>::is_failure(&k, Ok(&resp(503))));
        assert!(Classify::<_, ()>::is_failure(&k, Ok(&resp(500))));
        assert!(!Classify::<_, ()>::is_failure(&k, Ok(&resp(404))));
        assert!(!Classify::<_, ()>::is_failure(&k, Ok(&resp(200))));
        assert!(Classify::<http::Response<()>, ()>::is_failure(&k, Err(&())));
    }
}
