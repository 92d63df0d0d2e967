//! `http`: makes one HTTP request.
//!
//! Payload: `{"url": "http://...", "method": "POST", "headers": {"K": "V"},
//! "body": any, "timeoutSeconds": 10}`. `method` defaults to GET, or POST
//! when there is a body. A string body is sent as is; any other JSON value
//! is sent as JSON (with `content-type: application/json` unless a header
//! sets one). A 2xx status succeeds with `{"status", "body"}` (the body's
//! last 4 KiB) as the result; any other status fails the attempt.
//!
//! Uses the worker's shared HTTP client, which is built without TLS: plain
//! `http://` URLs only.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Tail, OUTPUT_TAIL_BYTES};
use crate::handler::{JobContext, JobError, JobHandler, JobResult};

#[derive(Debug, Clone)]
pub struct HttpHandler {
    http: reqwest::Client,
}

impl HttpHandler {
    pub fn new(http: reqwest::Client) -> Self {
        HttpHandler { http }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpPayload {
    url: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    timeout_seconds: Option<f64>,
}

fn bad(msg: impl std::fmt::Display) -> JobError {
    JobError::new(format!("invalid http payload: {msg}"))
}

impl HttpHandler {
    async fn run(&self, p: HttpPayload) -> JobResult {
        let body = p.body.filter(|b| !b.is_null());
        let method = match &p.method {
            Some(m) => {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| bad(format!("method {m:?}")))?
            }
            None if body.is_some() => Method::POST,
            None => Method::GET,
        };
        let url = reqwest::Url::parse(&p.url).map_err(|e| bad(format!("url {:?}: {e}", p.url)))?;
        let mut rb = self.http.request(method, url);
        let mut has_content_type = false;
        for (k, v) in &p.headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad(format!("header name {k:?}")))?;
            let value = HeaderValue::from_str(v).map_err(|_| bad(format!("value of header {k:?}")))?;
            has_content_type |= name == CONTENT_TYPE;
            rb = rb.header(name, value);
        }
        match body {
            Some(Value::String(s)) => rb = rb.body(s),
            Some(v) => {
                if !has_content_type {
                    rb = rb.header(CONTENT_TYPE, "application/json");
                }
                rb = rb.body(v.to_string());
            }
            None => {}
        }
        if let Some(t) = p.timeout_seconds {
            let t = Duration::try_from_secs_f64(t).map_err(|_| bad("timeoutSeconds must be a non-negative number"))?;
            rb = rb.timeout(t);
        }
        let mut resp = rb
            .send()
            .await
            .map_err(|e| JobError::new(format!("request failed: {}", jobsched_client::error_chain(&e))))?;
        let status = resp.status();
        let mut tail = Tail::new(OUTPUT_TAIL_BYTES);
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => tail.push(&c),
                Ok(None) => break,
                Err(e) => {
                    return Err(JobError::new(format!(
                        "reading the response body: {}",
                        jobsched_client::error_chain(&e)
                    )))
                }
            }
        }
        if status.is_success() {
            Ok(Some(json!({ "status": status.as_u16(), "body": tail.text() })))
        } else {
            Err(JobError::new(format!("HTTP {}: {}", status.as_u16(), tail.text())))
        }
    }
}

impl JobHandler for HttpHandler {
    fn job_type(&self) -> &str {
        "http"
    }

    async fn execute(&self, ctx: JobContext) -> JobResult {
        let p: HttpPayload = serde_json::from_value(ctx.payload.clone()).map_err(bad)?;
        tokio::select! {
            r = self.run(p) => r,
            _ = ctx.cancel.cancelled() => Err(JobError::new("cancelled")),
        }
    }
}
