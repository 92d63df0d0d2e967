//! The coordinator node: configuration, bootstrap, the REST API with leader
//! forwarding, and the leader's monitors. `main` is a thin wrapper around
//! [`run`], so tests can start nodes in-process too.

pub mod config;
pub mod http;
pub mod leader;
pub mod node;
pub mod proposer;

pub use config::{Config, Flags, Peer};
pub use node::{run, run_with_listener};
pub use proposer::{system_clock, Clock};

/// Install the tracing subscriber: text (default) or JSON lines.
pub fn init_logging(format: &str, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let _ = if format == "json" { builder.json().try_init() } else { builder.try_init() };
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
