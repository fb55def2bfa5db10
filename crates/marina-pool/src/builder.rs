//! `Builder`: a pool's configuration plus its liveness hooks.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use marina_core::Probe;

use crate::check::default_check;
use crate::config::{Config, ConnectRetry, Problem, Reuse};
use crate::core::CheckFn;
use crate::error::PoolError;
use crate::manage::{Hooks, Managed};
use crate::pool::{Connector, Pool, Target};

fn type_mismatch(hook: &str) -> PoolError {
    PoolError::Invalid(vec![Problem {
        field: if hook == "probe" { "probe" } else { "check" },
        message: format!(
            "the {hook} was written for another connection type than the connector makes"
        ),
    }])
}

/// Configures and builds a [`Pool`]: a method per [`Config`] field, plus the liveness
/// hooks. Start from [`Pool::builder`] or from a [`Config`] (`Builder::from(config)`).
#[derive(Clone, Default)]
pub struct Builder {
    pub(crate) config: Config,
    name: Option<Arc<str>>,
    check: Option<Arc<dyn Any + Send + Sync>>,
    probe: Option<Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("name", &self.name)
            .field("check", &self.check.is_some())
            .field("probe", &self.probe.is_some())
            .finish()
    }
}

impl From<Config> for Builder {
    fn from(config: Config) -> Self {
        Builder {
            config,
            ..Builder::default()
        }
    }
}

macro_rules! knobs {
    ($($(#[$doc:meta])* $name:ident: $ty:ty => $conv:expr;)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            #[allow(clippy::redundant_closure_call)]
            { self.config.$name = ($conv)(value); }
            self
        }
    )*};
}

/// A pool's liveness hooks, typed: the user's checkout check and background probe.
pub(crate) type UserHooks<X> = (Option<CheckFn<X>>, Option<Arc<dyn Probe<X>>>);

/// Everything a pool runs on its connections: the checkout check (the connector's and
/// the user's, or the default socket check), the background probe, and a
/// [`Managed`] connector's hooks.
pub(crate) struct PoolHooks<X> {
    pub(crate) check: Option<CheckFn<X>>,
    pub(crate) probe: Option<Arc<dyn Probe<X>>>,
    pub(crate) managed: Option<Arc<dyn Hooks<X>>>,
}

impl Builder {
    /// A builder with [`Config::default`]; the same as [`Pool::builder`].
    pub fn new() -> Self {
        Builder::default()
    }

    knobs! {
        /// See [`Config::min_idle`].
        min_idle: usize => |v| v;
        /// See [`Config::max_size`].
        max_size: usize => |v| v;
        /// See [`Config::acquire_timeout`]. Takes a `Duration`, or `None` to disable.
        acquire_timeout: impl Into<Option<Duration>> => Into::into;
        /// See [`Config::connect_timeout`]. Takes a `Duration`, or `None` to disable.
        connect_timeout: impl Into<Option<Duration>> => Into::into;
        /// See [`Config::idle_timeout`]. Takes a `Duration`, or `None` to disable.
        idle_timeout: impl Into<Option<Duration>> => Into::into;
        /// See [`Config::max_lifetime`]. Takes a `Duration`, or `None` to disable.
        max_lifetime: impl Into<Option<Duration>> => Into::into;
        /// See [`Config::health_check_interval`]. Takes a `Duration`, or `None` to disable.
        health_check_interval: impl Into<Option<Duration>> => Into::into;
        /// See [`Config::health_check_timeout`].
        health_check_timeout: Duration => |v| v;
        /// See [`Config::eviction_interval`].
        eviction_interval: Duration => |v| v;
        /// See [`Config::max_connecting`].
        max_connecting: usize => |v| v;
        /// See [`Config::reuse`].
        reuse: Reuse => |v| v;
        /// See [`Config::connect_retry`].
        connect_retry: ConnectRetry => |v| v;
    }

    /// Replaces the whole configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Disables idle timeout and max lifetime: connections live until they break.
    pub fn no_expiry(mut self) -> Self {
        self.config.idle_timeout = None;
        self.config.max_lifetime = None;
        self
    }

    /// Names the pool in events and metrics (default: the target's `Debug` text).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into().into());
        self
    }

    /// Replaces the liveness check run on an idle connection at checkout and before a
    /// background probe. It must be cheap (no I/O on the wire): return `false` if the
    /// connection is known to be unusable.
    ///
    /// The default checks socket state for `TcpStream` (and `UnixStream`, and hyper-util's
    /// `TokioIo` of either) with one non-blocking `recv(MSG_PEEK)` per checkout: a
    /// connection whose peer closed it (EOF or RST), or that has unread bytes waiting (a
    /// previous user did not read its whole reply), is closed instead of handed out.
    /// Other types pass: for a client that is not a socket (a database client, say),
    /// prefer a connector that knows its clients ([`Manage::is_broken`](crate::Manage::is_broken)),
    /// so every pool of it is safe without this hook.
    ///
    /// With a [`Managed`] connector, this check runs after the connector's own
    /// `is_broken` instead of replacing it.
    ///
    /// A check that panics closes the connection it was checking (its slot is freed)
    /// before the panic reaches the caller of `get()`.
    ///
    /// The hook is typed by the connection it checks; a hook for another type than the
    /// connector makes is reported by `build` as [`PoolError::Invalid`].
    ///
    /// # Examples
    ///
    /// ```
    /// use marina_pool::{Pool, TcpConnector, socket_is_open};
    /// use tokio::net::TcpStream;
    ///
    /// # fn main() -> Result<(), marina_pool::PoolError> {
    /// # let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    /// // Keep the socket check, and refuse connections whose peer is not the target.
    /// let pool = Pool::builder()
    ///     .check(move |s: &mut TcpStream| socket_is_open(s) && s.peer_addr().is_ok_and(|p| p == addr))
    ///     .build(TcpConnector::new(), addr)?;
    /// # drop(pool); Ok(()) }
    /// ```
    pub fn check<X, F>(mut self, check: F) -> Self
    where
        X: 'static,
        F: Fn(&mut X) -> bool + Send + Sync + 'static,
    {
        let f: CheckFn<X> = Arc::new(check);
        self.check = Some(Arc::new(f));
        self
    }

    /// Adds a [`Probe`] run on idle connections every `health_check_interval` (for
    /// example a ping). A probe that fails or outlasts `health_check_timeout` closes the
    /// connection. Typed by the connection it probes, like [`check`](Self::check).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use marina_core::{BoxError, probe_fn};
    /// use marina_pool::{Pool, TcpConnector};
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// use tokio::net::TcpStream;
    ///
    /// # fn main() -> Result<(), marina_pool::PoolError> {
    /// # let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    /// // An echo server must echo a ping.
    /// let ping = probe_fn(|s: &mut TcpStream| {
    ///     Box::pin(async move {
    ///         s.write_all(b"ping\n").await?;
    ///         let mut reply = [0; 5];
    ///         s.read_exact(&mut reply).await?;
    ///         if &reply == b"ping\n" { Ok(()) } else { Err(BoxError::from("bad echo")) }
    ///     })
    /// });
    /// let pool = Pool::builder()
    ///     .health_check_interval(Duration::from_secs(30))
    ///     .probe(ping)
    ///     .build(TcpConnector::new(), addr)?;
    /// # drop(pool); Ok(()) }
    /// ```
    pub fn probe<X, P>(mut self, probe: P) -> Self
    where
        X: 'static,
        P: Probe<X>,
    {
        let p: Arc<dyn Probe<X>> = Arc::new(probe);
        self.probe = Some(Arc::new(p));
        self
    }

    /// The configuration so far.
    pub fn as_config(&self) -> &Config {
        &self.config
    }

    /// The pool's name for `target`: the one set by [`name`](Self::name), else the
    /// target's `Debug` text.
    pub(crate) fn pool_name<T: fmt::Debug>(&self, target: &T) -> Arc<str> {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("{target:?}").into(),
        }
    }

    /// Every hook a pool over `connector` runs; an error if one was written for another
    /// connection type.
    pub(crate) fn pool_hooks<C, T>(
        &self,
        connector: &C,
    ) -> Result<PoolHooks<C::Response>, PoolError>
    where
        C: Connector<T>,
        T: Target,
    {
        let (user_check, probe) = self.hooks::<C::Response>()?;
        let any: &dyn Any = connector;
        let managed = any
            .downcast_ref::<Managed<C::Response, T>>()
            .map(Managed::hooks);
        let check: Option<CheckFn<C::Response>> = match (&managed, user_check) {
            (Some(m), Some(f)) => {
                let m = m.clone();
                Some(Arc::new(move |c: &mut C::Response| !m.is_broken(c) && f(c)))
            }
            (Some(m), None) => {
                let m = m.clone();
                Some(Arc::new(move |c: &mut C::Response| !m.is_broken(c)))
            }
            (None, Some(f)) => Some(f),
            (None, None) => default_check::<C::Response>(),
        };
        Ok(PoolHooks {
            check,
            probe,
            managed,
        })
    }

    /// The user's hooks, typed for connections of type `X`; an error if one was
    /// written for another type.
    pub(crate) fn hooks<X: 'static>(&self) -> Result<UserHooks<X>, PoolError> {
        let check = match &self.check {
            None => None,
            Some(any) => Some(
                any.downcast_ref::<CheckFn<X>>()
                    .cloned()
                    .ok_or_else(|| type_mismatch("check"))?,
            ),
        };
        let probe = match &self.probe {
            None => None,
            Some(any) => Some(
                any.downcast_ref::<Arc<dyn Probe<X>>>()
                    .cloned()
                    .ok_or_else(|| type_mismatch("probe"))?,
            ),
        };
        Ok((check, probe))
    }

    /// Builds the pool for `target`, opened through `connector`.
    ///
    /// Warm-up to `min_idle` starts in the background at once when called inside a tokio
    /// runtime (else on first use); [`Pool::ready_min`] waits for it.
    ///
    /// Fails with [`PoolError::Invalid`] listing every configuration error, or when a
    /// `check`/`probe` hook was written for another connection type.
    pub fn build<C, T>(&self, connector: C, target: T) -> Result<Pool<C, T>, PoolError>
    where
        C: Connector<T>,
        T: Target,
    {
        Pool::from_parts(self, connector, target)
    }
}
