//! Problems found in a stack's settings.

use std::fmt;

/// One problem in a stack's settings (a [`StackBuilder`](crate::StackBuilder)'s or a
/// `StackConfig`'s), with the path of the setting at fault, as the TOML file names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Where: `endpoints[1]`, `pool.min_idle`, …
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Settings that cannot build a stack: every problem found, each with its path.
/// [`StackBuilder::build`](crate::StackBuilder::build) returns it (inside its
/// `BoxError`: downcast to read it), and `StackConfig::from_toml` + `validate` name the
/// same problems with the same paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidConfig(pub Vec<ConfigProblem>);

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid stack configuration:")?;
        for p in &self.0 {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidConfig {}
