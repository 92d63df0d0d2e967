//! `fail`: always fails, with `payload.message` or "fail handler". Useful to
//! exercise retries and dead jobs.

use crate::handler::{JobContext, JobError, JobHandler, JobResult};

#[derive(Debug, Clone, Copy, Default)]
pub struct FailHandler;

impl JobHandler for FailHandler {
    fn job_type(&self) -> &str {
        "fail"
    }

    async fn execute(&self, ctx: JobContext) -> JobResult {
        let message = ctx.payload.get("message").and_then(|m| m.as_str()).unwrap_or("fail handler");
        Err(JobError::new(message))
    }
}
