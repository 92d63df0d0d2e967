//! A worker with a custom Rust handler: counts the words of `payload.text`.
//!
//! Run a cluster, then:
//!
//! ```text
//! cargo run -p jobsched-worker --example custom_handler
//! jobsched submit --type word-count --payload '{"text": "to be or not to be"}'
//! ```
//!
//! Coordinators come from `JOBSCHED_COORDINATORS` (comma-separated) or the
//! local default. Ctrl-C drains and deregisters.

use jobsched_worker::{CancellationToken, JobContext, JobHandler, JobResult, LogFormat, Worker};
use serde_json::json;

struct WordCount;

impl JobHandler for WordCount {
    fn job_type(&self) -> &str {
        "word-count"
    }

    async fn execute(&self, ctx: JobContext) -> JobResult {
        let text = ctx.payload["text"].as_str().ok_or("payload.text must be a string")?;
        Ok(Some(json!({ "words": text.split_whitespace().count() })))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    jobsched_worker::init_tracing(LogFormat::Text);
    let coordinators =
        std::env::var("JOBSCHED_COORDINATORS").unwrap_or_else(|_| jobsched_client::DEFAULT_COORDINATORS.to_owned());
    let worker = Worker::builder()
        .coordinators(jobsched_client::parse_coordinators(&coordinators))
        .capacity(4)
        .handler(WordCount)
        .build()?;

    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        trigger.cancel();
    });
    worker.run(shutdown).await?;
    Ok(())
}
