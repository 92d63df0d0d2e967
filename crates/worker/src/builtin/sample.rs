//! `sample`: sleeps `payload.durationMs` milliseconds (5 s, the original
//! system's sample job, when the payload is not an object with that field),
//! then succeeds with `{"sleptMs": n}`. Cancellable.

use std::time::Duration;

use serde_json::json;

use crate::handler::{JobContext, JobError, JobHandler, JobResult};

/// Sleep of the original sample job.
pub const DEFAULT_SAMPLE_MS: u64 = 5000;

#[derive(Debug, Clone, Copy, Default)]
pub struct SampleHandler;

fn duration_ms(payload: &serde_json::Value) -> Result<u64, JobError> {
    match payload.get("durationMs") {
        None | Some(serde_json::Value::Null) => Ok(DEFAULT_SAMPLE_MS),
        Some(v) => match (v.as_u64(), v.as_f64()) {
            (Some(ms), _) => Ok(ms),
            (None, Some(f)) if f.is_finite() && f >= 0.0 && f <= u64::MAX as f64 => Ok(f.round() as u64),
            _ => Err(JobError::new(format!("payload.durationMs must be a non-negative number, got {v}"))),
        },
    }
}

impl JobHandler for SampleHandler {
    fn job_type(&self) -> &str {
        "sample"
    }

    async fn execute(&self, ctx: JobContext) -> JobResult {
        let ms = duration_ms(&ctx.payload)?;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(Some(json!({ "sleptMs": ms }))),
            _ = ctx.cancel.cancelled() => Err(JobError::new("cancelled")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_ms(&json!({"durationMs": 250})).unwrap(), 250);
        assert_eq!(duration_ms(&json!({"durationMs": 2.6})).unwrap(), 3);
        assert_eq!(duration_ms(&json!({})).unwrap(), DEFAULT_SAMPLE_MS);
        assert_eq!(duration_ms(&json!("text")).unwrap(), DEFAULT_SAMPLE_MS);
        assert_eq!(duration_ms(&json!(null)).unwrap(), DEFAULT_SAMPLE_MS);
        assert!(duration_ms(&json!({"durationMs": -1})).is_err());
        assert!(duration_ms(&json!({"durationMs": "5"})).is_err());
    }
}
