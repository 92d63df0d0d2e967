//! Built-in handlers: `echo`, `sample`, `shell`, `http` and `fail`.
//!
//! Each is an ordinary [`crate::JobHandler`]; [`builtin`] looks one up by
//! its job type so the binary can enable them from configuration. They honour
//! cancellation: a cancelled run stops promptly and leaves no process behind.

mod echo;
mod fail;
mod http;
mod sample;
mod shell;
mod tail;

use std::sync::Arc;

pub use echo::EchoHandler;
pub use fail::FailHandler;
pub use http::HttpHandler;
pub use sample::SampleHandler;
pub use shell::{kill_running_processes, ShellHandler};
pub(crate) use tail::Tail;

use crate::handler::SharedHandler;

/// Job types of the built-in handlers.
pub const BUILTIN_TYPES: [&str; 5] = ["echo", "sample", "shell", "http", "fail"];

/// Most bytes of a process's or a response's output kept in results: the
/// last 4 KiB, where errors usually are.
pub const OUTPUT_TAIL_BYTES: usize = 4096;

/// The built-in handler for `job_type`; `http` is the process's shared HTTP
/// client (used by the `http` handler).
pub fn builtin(job_type: &str, http: &reqwest::Client) -> Option<SharedHandler> {
    Some(match job_type {
        "echo" => Arc::new(EchoHandler),
        "sample" => Arc::new(SampleHandler),
        "shell" => Arc::new(ShellHandler),
        "http" => Arc::new(HttpHandler::new(http.clone())),
        "fail" => Arc::new(FailHandler),
        _ => return None,
    })
}

/// Every built-in handler.
pub fn all(http: &reqwest::Client) -> Vec<SharedHandler> {
    BUILTIN_TYPES.iter().filter_map(|t| builtin(t, http)).collect()
}
