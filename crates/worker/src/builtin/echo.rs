//! `echo`: logs the payload and returns it as the result.

use crate::handler::{JobContext, JobHandler, JobResult};

#[derive(Debug, Clone, Copy, Default)]
pub struct EchoHandler;

impl JobHandler for EchoHandler {
    fn job_type(&self) -> &str {
        "echo"
    }

    async fn execute(&self, ctx: JobContext) -> JobResult {
        tracing::info!(job_id = %ctx.job_id, payload = %ctx.payload, "echo");
        Ok(Some(ctx.payload))
    }
}
