//! The `weir` binary: Envoy's command line, then serve.
use clap::Parser;
use weir::cli::{Mode, Options};

/// glibc's malloc with a per-thread cache on the workers (`weir::alloc`).
#[global_allocator]
static ALLOC: weir::alloc::WeirAlloc = weir::alloc::WeirAlloc;

fn main() {
    // As Envoy: a bad command line exits 1 (clap would use 2).
    let o = match Options::try_parse() {
        Ok(o) => o,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                _ => 1,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    // `--log-format` wins over the bootstrap's `application_log_config`
    // (read before logging starts, as Envoy applies it at start-up).
    let log_format = o
        .log_format
        .clone()
        .or_else(|| weir::bootstrap_log_format(&o));
    if let Err(e) = weir::logging::init(
        &o.log_level,
        o.component_log_level.as_deref(),
        o.log_path.as_deref(),
        log_format.as_deref(),
    ) {
        eprintln!("weir: {e}");
        std::process::exit(1);
    }
    if o.enable_core_dump {
        if let Err(e) = weir::netif::enable_core_dumps() {
            eprintln!("weir: --enable-core-dump: {e}");
        }
    }
    let (bootstrap, snapshot) = match weir::load_config(&o) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("weir: invalid configuration:\n{e}");
            std::process::exit(1);
        }
    };
    match o.mode {
        Mode::Validate => {
            println!(
                "configuration '{}' OK",
                o.config_path.as_deref().unwrap_or("<embedded>")
            );
            return;
        }
        Mode::InitOnly => {
            // Bind everything, then exit (as Envoy's init_only).
            match weir::Server::start(o, bootstrap, snapshot) {
                Ok(s) => {
                    s.begin_shutdown();
                    s.wait();
                    return;
                }
                Err(e) => {
                    eprintln!("weir: {e:#}");
                    std::process::exit(1);
                }
            }
        }
        Mode::Serve => {}
    }
    let server = match weir::Server::start(o, bootstrap, snapshot) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("weir: {e:#}");
            std::process::exit(1);
        }
    };
    if let Some(a) = server.admin_addr() {
        tracing::info!(address = %a, "admin listening");
    }
    let shared = server.shared.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("signal runtime");
        rt.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        });
        tracing::info!("signal received: draining");
        weir::app::begin_drain(&shared, true);
    });
    server.wait();
}
