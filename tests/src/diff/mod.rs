//! The differential harness: run real Envoy and weir on the same bootstrap,
//! send both the same requests, compare what came back.
//!
//! Inputs (all under `tests/diff/`):
//! - `configs/<name>.yaml`: Envoy v3 static bootstraps with placeholders
//!   (see [`Vars`]).
//! - `cases/*.yaml`: request corpus, one [`CaseFile`] per file.
//! - `allowlist.yaml`: intended divergences ([`AllowEntry`]), explained in
//!   `ALLOWLIST.md`.
//!
//! There are no hand-written expectations: Envoy's answer is the
//! expectation.
mod run;
mod template;
mod view;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

pub use run::{run, Mismatch, Options, Report, Target};
pub use template::{render, Vars};
pub use view::{flatten, FlatView};

/// `tests/diff/` in the source tree.
pub fn diff_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("diff")
}

/// One file of `tests/diff/cases/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    /// Default config for the cases in this file (name of
    /// `configs/<name>.yaml`, without extension).
    pub config: String,
    pub cases: Vec<Case>,
}

/// Which client a case uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientProto {
    /// HTTP/1.x over a raw socket.
    #[default]
    H1,
    /// HTTP/2 cleartext with prior knowledge.
    H2c,
}

/// One request case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// Unique within its config.
    pub id: String,
    /// Overrides the file's `config`.
    #[serde(default)]
    pub config: Option<String>,
    #[serde(default)]
    pub desc: Option<String>,
    #[serde(default)]
    pub proto: ClientProto,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_path")]
    pub path: String,
    /// `Host` (HTTP/1) or `:authority` (HTTP/2).
    #[serde(default = "default_host")]
    pub host: String,
    /// HTTP/1 only: send no `Host` header at all.
    #[serde(default)]
    pub no_host: bool,
    /// HTTP/1 request-line version.
    #[serde(default = "default_version")]
    pub version: String,
    /// HTTP/2 `:scheme`.
    #[serde(default = "default_scheme")]
    pub scheme: String,
    /// Sent in order, after `Host`.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body: Option<String>,
    /// HTTP/1: do not add `content-length` for `body`.
    #[serde(default)]
    pub no_content_length: bool,
    /// Do not add the per-request `x-echo-id` header.
    #[serde(default)]
    pub no_echo_id: bool,
    /// Raw HTTP/1 bytes, sent verbatim after template expansion; replaces
    /// all request fields above. Compared on `outcome` and `status` unless
    /// `compare` says otherwise.
    #[serde(default)]
    pub raw: Option<String>,
    /// Flattened fields to compare (prefix match, e.g. `status`,
    /// `header.location`, `upstream.`). Default: everything.
    #[serde(default)]
    pub compare: Option<Vec<String>>,
    /// Read timeout for this case.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_method() -> String {
    "GET".into()
}
fn default_path() -> String {
    "/".into()
}
fn default_host() -> String {
    "example.com".into()
}
fn default_version() -> String {
    "HTTP/1.1".into()
}
fn default_scheme() -> String {
    "http".into()
}
fn default_timeout_ms() -> u64 {
    3000
}

impl Case {
    /// The fields compared for this case (prefixes); `None` = all.
    pub fn compared(&self) -> Option<Vec<String>> {
        match (&self.compare, &self.raw) {
            (Some(c), _) => Some(c.clone()),
            (None, Some(_)) => Some(vec!["outcome".into(), "status".into()]),
            (None, None) => None,
        }
    }
}

/// An intended divergence: `case` and `field` are globs (`*` only) over
/// `<config>/<case id>` and the flattened field name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    pub case: String,
    pub field: String,
    pub reason: String,
}

/// Everything under `tests/diff/`, loaded and checked.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// config name -> bootstrap template
    pub configs: BTreeMap<String, String>,
    /// config name -> cases, in file order
    pub cases: BTreeMap<String, Vec<Case>>,
    pub allow: Vec<AllowEntry>,
}

impl Corpus {
    pub fn load(dir: &Path) -> anyhow::Result<Corpus> {
        let mut configs = BTreeMap::new();
        for path in yaml_files(&dir.join("configs"))? {
            let name = stem(&path);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("read {}", path.display()))?;
            configs.insert(name, text);
        }
        let mut cases: BTreeMap<String, Vec<Case>> = BTreeMap::new();
        for path in yaml_files(&dir.join("cases"))? {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("read {}", path.display()))?;
            let file: CaseFile =
                serde_yaml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
            for case in file.cases {
                let config = case.config.clone().unwrap_or_else(|| file.config.clone());
                if !configs.contains_key(&config) {
                    bail!(
                        "{}: case {} names unknown config {config:?}",
                        path.display(),
                        case.id
                    );
                }
                let list = cases.entry(config.clone()).or_default();
                if list.iter().any(|c| c.id == case.id) {
                    bail!("{}: duplicate case id {config}/{}", path.display(), case.id);
                }
                list.push(case);
            }
        }
        let allow_path = dir.join("allowlist.yaml");
        let allow: Vec<AllowEntry> = match std::fs::read_to_string(&allow_path) {
            Ok(text) => serde_yaml::from_str::<Option<Vec<AllowEntry>>>(&text)
                .with_context(|| format!("parse {}", allow_path.display()))?
                .unwrap_or_default(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("read {}", allow_path.display())),
        };
        for a in &allow {
            if a.reason.trim().is_empty() {
                bail!("allowlist entry {}/{} has no reason", a.case, a.field);
            }
        }
        Ok(Corpus {
            configs,
            cases,
            allow,
        })
    }

    pub fn case_count(&self) -> usize {
        self.cases.values().map(Vec::len).sum()
    }

    /// Cases sent as raw (possibly malformed) bytes.
    pub fn raw_case_count(&self) -> usize {
        self.cases
            .values()
            .flatten()
            .filter(|c| c.raw.is_some())
            .count()
    }

    /// Configs that at least one case uses.
    pub fn used_configs(&self) -> usize {
        self.cases.values().filter(|v| !v.is_empty()).count()
    }
}

fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `*`-only glob match.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(pos) => rest = &rest[pos + part.len()..],
                None => return false,
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("a/*", "a/b"));
        assert!(glob_match("*", ""));
        assert!(glob_match("header.x-*-id", "header.x-request-id"));
        assert!(!glob_match("a/b", "a/bc"));
        assert!(!glob_match("a*c", "abd"));
    }

    #[test]
    fn corpus_loads() {
        let c = Corpus::load(&diff_dir()).expect("corpus");
        assert!(!c.configs.is_empty());
    }
}
