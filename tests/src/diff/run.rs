//! Running the corpus against a reference (Envoy) and a candidate (weir, or
//! Envoy again for the self-check) and comparing.
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;

use super::template::{render, Vars};
use super::view::{flatten, FlatView, Masks};
use super::{glob_match, AllowEntry, Case, ClientProto, Corpus};
use crate::client::{self, H2Request, Outcome};
use crate::proc::{EnvoyProc, ProxyProc, WeirProc};
use crate::{free_port, upstream};

/// Which proxy a side runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Envoy,
    Weir,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Envoy => "envoy",
            Target::Weir => "weir",
        }
    }

    fn start(self, config: &str) -> anyhow::Result<ProxyProc> {
        match self {
            Target::Envoy => EnvoyProc::start(config),
            Target::Weir => WeirProc::start(config),
        }
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Compared against Envoy: weir normally, Envoy for the self-check.
    pub candidate: Target,
    /// Glob over config names.
    pub configs: Option<String>,
    /// Glob over `<config>/<case id>`.
    pub cases: Option<String>,
    /// Configs run at the same time.
    pub parallel: usize,
    /// Apply the allow-list (off for the self-check: Envoy must match itself
    /// exactly).
    pub use_allowlist: bool,
}

impl Options {
    /// From the environment: `WEIR_DIFF_SELF_CHECK=1` (Envoy vs Envoy),
    /// `WEIR_DIFF_CONFIGS=<glob>`, `WEIR_DIFF_CASES=<glob over config/id>`,
    /// `WEIR_DIFF_PARALLEL=<n>` (default 2).
    pub fn from_env() -> Options {
        let self_check =
            std::env::var("WEIR_DIFF_SELF_CHECK").is_ok_and(|v| v != "0" && !v.is_empty());
        let nonempty = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Options {
            candidate: if self_check {
                Target::Envoy
            } else {
                Target::Weir
            },
            configs: nonempty("WEIR_DIFF_CONFIGS"),
            cases: nonempty("WEIR_DIFF_CASES"),
            parallel: nonempty("WEIR_DIFF_PARALLEL")
                .and_then(|v| v.parse().ok())
                .unwrap_or(2)
                .max(1),
            use_allowlist: !self_check,
        }
    }
}

/// One field that differs.
#[derive(Debug, Clone)]
pub struct FieldDiff {
    pub field: String,
    pub reference: Option<String>,
    pub candidate: Option<String>,
    /// The allow-list reason, when this divergence is intended.
    pub allowed: Option<String>,
}

/// A case whose views differ.
#[derive(Debug, Clone)]
pub struct Mismatch {
    /// `<config>/<case id>`
    pub case: String,
    pub request: String,
    pub fields: Vec<FieldDiff>,
}

impl Mismatch {
    /// Every differing field is allow-listed.
    pub fn fully_allowed(&self) -> bool {
        self.fields.iter().all(|f| f.allowed.is_some())
    }
}

/// The result of a run.
#[derive(Debug, Default)]
pub struct Report {
    pub reference: &'static str,
    pub candidate: &'static str,
    pub configs_run: usize,
    pub cases_run: usize,
    /// Cases with differences (allowed or not), in corpus order.
    pub mismatches: Vec<Mismatch>,
    /// (config, error) for configs that could not be run.
    pub failures: Vec<(String, String)>,
    /// Allow-list entries that matched nothing.
    pub unused_allow: Vec<AllowEntry>,
    pub elapsed: Duration,
}

impl Report {
    /// No unexplained difference and nothing failed to run.
    pub fn is_clean(&self) -> bool {
        self.failures.is_empty() && self.mismatches.iter().all(Mismatch::fully_allowed)
    }

    pub fn unexplained(&self) -> impl Iterator<Item = &Mismatch> {
        self.mismatches.iter().filter(|m| !m.fully_allowed())
    }

    /// Human-readable summary plus a diff per mismatching case.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let bad = self.unexplained().count();
        let allowed = self.mismatches.len() - bad;
        let _ = writeln!(
            s,
            "== differential {} vs {}: {} configs, {} cases, {} mismatching, {} allow-listed, {} config failures ({:.1?})",
            self.reference,
            self.candidate,
            self.configs_run,
            self.cases_run,
            bad,
            allowed,
            self.failures.len(),
            self.elapsed
        );
        for (config, err) in &self.failures {
            let _ = writeln!(
                s,
                "\n-- config {config}: could not run:\n{}",
                indent(err, "   ")
            );
        }
        for m in self.unexplained() {
            let _ = writeln!(s, "\n-- {}  [{}]", m.case, m.request);
            // When the outcome or status differs, the remaining fields are
            // consequences: name them instead of printing them.
            let headline = m
                .fields
                .iter()
                .any(|f| f.field == "outcome" || f.field == "status");
            let mut rest = Vec::new();
            for f in &m.fields {
                let key = headline
                    && !matches!(
                        f.field.as_str(),
                        "outcome" | "status" | "body" | "header.location" | "header.content-type"
                    );
                if key {
                    rest.push(f.field.as_str());
                    continue;
                }
                let mark = if f.allowed.is_some() {
                    " (allowed)"
                } else {
                    ""
                };
                let _ = writeln!(s, "   {}{mark}:", f.field);
                let _ = writeln!(s, "      {:<6} {}", self.reference, show(&f.reference));
                let _ = writeln!(s, "      {:<6} {}", self.candidate, show(&f.candidate));
            }
            if !rest.is_empty() {
                let _ = writeln!(
                    s,
                    "   (+ {} more differing fields: {})",
                    rest.len(),
                    rest.join(", ")
                );
            }
        }
        if allowed > 0 {
            let _ = writeln!(s, "\n-- allow-listed divergences:");
            for m in self.mismatches.iter().filter(|m| m.fully_allowed()) {
                let fields: Vec<&str> = m.fields.iter().map(|f| f.field.as_str()).collect();
                let _ = writeln!(s, "   {}: {}", m.case, fields.join(", "));
            }
        }
        for a in &self.unused_allow {
            let _ = writeln!(
                s,
                "\nnote: allow-list entry {} / {} matched nothing in this run",
                a.case, a.field
            );
        }
        s
    }
}

fn indent(s: &str, pre: &str) -> String {
    s.lines()
        .map(|l| format!("{pre}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn show(v: &Option<String>) -> String {
    const MAX: usize = 400;
    match v {
        None => "<absent>".into(),
        Some(v) if v.len() > MAX => {
            let mut end = MAX;
            while !v.is_char_boundary(end) {
                end -= 1;
            }
            format!("{:?}... ({} bytes)", &v[..end], v.len())
        }
        Some(v) => format!("{v:?}"),
    }
}

/// Runs `corpus` per `opts`.
pub async fn run(corpus: &Corpus, opts: &Options) -> Report {
    let start = Instant::now();
    let reference = Target::Envoy;
    let allow = if opts.use_allowlist {
        corpus.allow.clone()
    } else {
        Vec::new()
    };
    let allow = Arc::new(allow);
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.parallel));
    let mut tasks = Vec::new();
    for (name, template) in &corpus.configs {
        if opts
            .configs
            .as_deref()
            .is_some_and(|g| !glob_match(g, name))
        {
            continue;
        }
        let cases: Vec<Case> = corpus
            .cases
            .get(name)
            .into_iter()
            .flatten()
            .filter(|c| {
                opts.cases
                    .as_deref()
                    .is_none_or(|g| glob_match(g, &format!("{name}/{}", c.id)))
            })
            .cloned()
            .collect();
        if cases.is_empty() {
            continue;
        }
        let (name, template) = (name.clone(), template.clone());
        let (sem, allow, candidate) = (sem.clone(), allow.clone(), opts.candidate);
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let n = cases.len();
            let res = run_config(&name, &template, &cases, reference, candidate, &allow).await;
            (name, n, res)
        }));
    }
    let mut report = Report {
        reference: reference.name(),
        candidate: if opts.candidate == reference {
            "envoy2"
        } else {
            opts.candidate.name()
        },
        ..Report::default()
    };
    for t in tasks {
        match t.await {
            Ok((name, n, res)) => {
                report.configs_run += 1;
                match res {
                    Ok(mut ms) => {
                        report.cases_run += n;
                        report.mismatches.append(&mut ms);
                    }
                    Err(e) => report.failures.push((name, format!("{e:#}"))),
                }
            }
            Err(e) => report
                .failures
                .push(("?".into(), format!("task failed: {e}"))),
        }
    }
    let used: BTreeSet<(String, String)> = report
        .mismatches
        .iter()
        .flat_map(|m| {
            m.fields.iter().filter_map(|f| {
                f.allowed.as_ref()?;
                allow
                    .iter()
                    .find(|a| glob_match(&a.case, &m.case) && glob_match(&a.field, &f.field))
                    .map(|a| (a.case.clone(), a.field.clone()))
            })
        })
        .collect();
    report.unused_allow = allow
        .iter()
        .filter(|a| !used.contains(&(a.case.clone(), a.field.clone())))
        .cloned()
        .collect();
    report.elapsed = start.elapsed();
    report
}

/// One proxy under test plus what is needed to talk to it.
struct Side {
    proc: ProxyProc,
    vars: Vars,
    listener: SocketAddr,
    masks: Masks,
    tag: char,
}

/// `WEIR_DIFF_VERBOSE=1`: print the reference view of every case.
fn verbose() -> bool {
    std::env::var("WEIR_DIFF_VERBOSE").is_ok_and(|v| v == "1")
}

static ECHO_SEQ: AtomicU64 = AtomicU64::new(0);

async fn run_config(
    name: &str,
    template: &str,
    cases: &[Case],
    reference: Target,
    candidate: Target,
    allow: &[AllowEntry],
) -> anyhow::Result<Vec<Mismatch>> {
    let a = upstream::http1("a").await?;
    let b = upstream::http1("b").await?;
    let h2 = upstream::http2("h2").await?;
    let mut base = Vars::default();
    base.set("UPSTREAM_A_PORT", a.port())
        .set("UPSTREAM_B_PORT", b.port())
        .set("UPSTREAM_H2_PORT", h2.port())
        .set("UPSTREAM_A", a.addr())
        .set("UPSTREAM_B", b.addr())
        .set("UPSTREAM_H2", h2.addr())
        .set("CLOSED_PORT", free_port());

    let launch = |target: Target, tag: char| {
        let base = base.clone();
        let template = template.to_owned();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Side> {
            // Ports are picked before the proxy binds them; if another
            // process got there first, try again with fresh ones.
            let mut attempt = 0;
            loop {
                attempt += 1;
                let mut vars = base.clone();
                let (lport, aport) = (free_port(), free_port());
                vars.set("LISTENER_PORT", lport).set("ADMIN_PORT", aport);
                let text =
                    render(&template, &vars).with_context(|| format!("render config {name}"))?;
                match target.start(&text) {
                    Ok(proc) => {
                        return Ok(Side {
                            proc,
                            vars,
                            listener: SocketAddr::from(([127, 0, 0, 1], lport)),
                            masks: Masks::new(lport, aport),
                            tag,
                        })
                    }
                    Err(e) if attempt < 3 && format!("{e:#}").contains("in use") => continue,
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("{} on config {name}", target.name()))
                    }
                }
            }
        })
    };
    let (r, c) = tokio::join!(launch(reference, 'r'), launch(candidate, 'c'));
    let r = r.context("launch task")??;
    let c = c.context("launch task")??;

    let mut out = Vec::new();
    for case in cases {
        let seq = ECHO_SEQ.fetch_add(1, Ordering::Relaxed);
        let (ro, co) = tokio::join!(send(case, &r, seq), send(case, &c, seq));
        let ro = ro?;
        let co = co?;
        let rv = flatten(&ro, &r.masks);
        let cv = flatten(&co, &c.masks);
        let id = format!("{name}/{}", case.id);
        if verbose() {
            let mut t = format!("[diff] {id} [{}]\n", describe(case));
            for (k, v) in &rv {
                let _ = writeln!(t, "    {k} = {}", show(&Some(v.clone())));
            }
            eprint!("{t}");
        }
        let fields = compare(&rv, &cv, case.compared().as_deref(), &id, allow);
        if !fields.is_empty() {
            out.push(Mismatch {
                case: id,
                request: describe(case),
                fields,
            });
        }
    }
    // Surface a crash of either proxy during the run.
    for side in [r, c] {
        let mut p = side.proc;
        if !p.is_running() {
            anyhow::bail!(
                "{} exited during the run.\n--- stderr ---\n{}",
                p.kind(),
                p.stderr()
            );
        }
    }
    Ok(out)
}

fn compare(
    r: &FlatView,
    c: &FlatView,
    only: Option<&[String]>,
    id: &str,
    allow: &[AllowEntry],
) -> Vec<FieldDiff> {
    let keys: BTreeSet<&String> = r.keys().chain(c.keys()).collect();
    keys.into_iter()
        .filter(|k| only.is_none_or(|o| o.iter().any(|p| k.starts_with(p.as_str()))))
        .filter(|k| r.get(*k) != c.get(*k))
        .map(|k| FieldDiff {
            field: k.clone(),
            reference: r.get(k).cloned(),
            candidate: c.get(k).cloned(),
            allowed: allow
                .iter()
                .find(|a| glob_match(&a.case, id) && glob_match(&a.field, k))
                .map(|a| a.reason.clone()),
        })
        .collect()
}

fn describe(case: &Case) -> String {
    let mut d = match (&case.raw, case.proto) {
        (Some(raw), _) => {
            let line = raw.lines().next().unwrap_or("");
            let line: String = line.chars().take(80).collect();
            format!("raw h1: {line:?}...")
        }
        (None, ClientProto::H1) => format!(
            "h1 {} {} host={}",
            case.method,
            case.path,
            if case.no_host { "<none>" } else { &case.host }
        ),
        (None, ClientProto::H2c) => {
            format!("h2c {} {} authority={}", case.method, case.path, case.host)
        }
    };
    if let Some(desc) = &case.desc {
        let _ = write!(d, " -- {desc}");
    }
    d
}

async fn send(case: &Case, side: &Side, seq: u64) -> anyhow::Result<Outcome> {
    let t = |s: &str| render(s, &side.vars).with_context(|| format!("case {}", case.id));
    let timeout = Duration::from_millis(case.timeout_ms);
    let echo_id = format!("{}-{seq:08x}", side.tag);
    if let Some(raw) = &case.raw {
        let bytes = t(raw)?;
        return Ok(client::http1_raw(side.listener, bytes.as_bytes(), timeout).await);
    }
    let mut headers = Vec::new();
    for (k, v) in &case.headers {
        headers.push((t(k)?, t(v)?));
    }
    if !case.no_echo_id {
        headers.push(("x-echo-id".to_owned(), echo_id));
    }
    let body = match &case.body {
        Some(b) => t(b)?,
        None => String::new(),
    };
    let (path, host) = (t(&case.path)?, t(&case.host)?);
    match case.proto {
        ClientProto::H1 => {
            let mut req = format!("{} {} {}\r\n", case.method, path, case.version);
            if !case.no_host {
                req.push_str(&format!("host: {host}\r\n"));
            }
            let framed = headers.iter().any(|(k, _)| {
                k.eq_ignore_ascii_case("content-length")
                    || k.eq_ignore_ascii_case("transfer-encoding")
            });
            for (k, v) in &headers {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            if case.body.is_some() && !framed && !case.no_content_length {
                req.push_str(&format!("content-length: {}\r\n", body.len()));
            }
            req.push_str("\r\n");
            req.push_str(&body);
            Ok(client::http1_raw(side.listener, req.as_bytes(), timeout).await)
        }
        ClientProto::H2c => {
            let req = H2Request {
                method: case.method.clone(),
                scheme: case.scheme.clone(),
                authority: host,
                path,
                headers,
                body: Bytes::from(body),
            };
            Ok(client::h2c(side.listener, &req, timeout).await)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(pairs: &[(&str, &str)]) -> FlatView {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn compare_reports_every_field_and_applies_allowlist() {
        let r = view(&[("status", "200"), ("header.a", "1"), ("header.b", "x")]);
        let c = view(&[("status", "404"), ("header.b", "x"), ("header.c", "2")]);
        let allow = vec![AllowEntry {
            case: "cfg/*".into(),
            field: "header.c".into(),
            reason: "test".into(),
        }];
        let d = compare(&r, &c, None, "cfg/one", &allow);
        let fields: Vec<&str> = d.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["header.a", "header.c", "status"]);
        assert!(d[1].allowed.is_some());
        assert!(d[0].allowed.is_none() && d[2].allowed.is_none());

        let only = vec!["status".to_owned()];
        let d = compare(&r, &c, Some(&only), "cfg/one", &allow);
        assert_eq!(d.len(), 1);
    }
}
