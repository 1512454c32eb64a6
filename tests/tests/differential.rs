//! Envoy vs weir, same bootstraps, same requests: every difference that is
//! not in `tests/diff/allowlist.yaml` fails the test.
//!
//! Run: `scripts/install-test-deps.sh` once, then
//! `cargo build -p weir && cargo test -p weir-tests --test differential`.
//! `WEIR_DIFF_SELF_CHECK=1` compares Envoy with itself (must be clean: it
//! proves the corpus is deterministic and the normalisation sound).
//! `WEIR_DIFF_CONFIGS` / `WEIR_DIFF_CASES` (globs) narrow the run.
use weir_tests::diff::{self, Corpus, Options};

/// Project requirement: at least 150 cases over at least 10 configs,
/// including malformed requests.
const MIN_CASES: usize = 150;
const MIN_CONFIGS: usize = 10;
const MIN_RAW_CASES: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_weir_agree() {
    let corpus = Corpus::load(&diff::diff_dir()).expect("load tests/diff");
    let opts = Options::from_env();
    // A filtered run is partial by design; the full run enforces the floor.
    let filtered = opts.configs.is_some() || opts.cases.is_some();
    assert!(
        filtered || corpus.case_count() >= MIN_CASES,
        "corpus has {} cases, need at least {MIN_CASES}",
        corpus.case_count()
    );
    assert!(
        filtered || corpus.used_configs() >= MIN_CONFIGS,
        "corpus uses {} configs, need at least {MIN_CONFIGS}",
        corpus.used_configs()
    );
    assert!(
        filtered || corpus.raw_case_count() >= MIN_RAW_CASES,
        "corpus has {} raw (malformed) cases, need at least {MIN_RAW_CASES}",
        corpus.raw_case_count()
    );
    // Fail, never skip, when a binary is missing.
    if let Err(e) = weir_tests::proc::envoy_binary() {
        panic!("{e:#}");
    }
    if opts.candidate == diff::Target::Weir {
        if let Err(e) = weir_tests::proc::weir_binary() {
            panic!("{e:#}");
        }
    }
    if opts.candidate == diff::Target::Weir {
        if let Some(warning) = weir_tests::proc::weir_binary_staleness() {
            println!("warning: {warning}");
        }
    }
    let report = diff::run(&corpus, &opts).await;
    println!("{}", report.render());
    assert!(
        report.is_clean(),
        "{} of {} cases differ between {} and {} without an allow-list entry, {} configs could not run (report above)",
        report.unexplained().count(),
        report.cases_run,
        report.reference,
        report.candidate,
        report.failures.len()
    );
}
