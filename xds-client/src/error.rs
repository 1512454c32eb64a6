//! Configuration errors: every error names the field path it is about.
use std::fmt;

/// One rejected field: `path` is Envoy's field path (`static_resources.listeners[0].name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidConfig {
    pub path: String,
    pub reason: String,
}

impl InvalidConfig {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

impl std::error::Error for InvalidConfig {}

/// All errors found in one configuration; its `Display` lists them one per line
/// (the text of a NACK's `error_detail` and of `--mode validate`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<InvalidConfig>);

impl ConfigErrors {
    pub fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(InvalidConfig::new(path, reason));
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Drops later errors about a path already reported.
    pub fn dedup(&mut self) {
        let mut seen = std::collections::HashSet::new();
        self.0.retain(|e| seen.insert(e.path.clone()));
    }

    pub fn into_result<T>(self, ok: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(ok)
        } else {
            Err(self)
        }
    }
    pub fn extend(&mut self, other: ConfigErrors) {
        self.0.extend(other.0);
    }
}

impl From<InvalidConfig> for ConfigErrors {
    fn from(e: InvalidConfig) -> Self {
        ConfigErrors(vec![e])
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Joins a parent path and a child field name.
pub fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}
