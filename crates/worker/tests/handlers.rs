//! Built-in handlers against real processes and real sockets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use jobsched_worker::builtin::{EchoHandler, FailHandler, HttpHandler, SampleHandler, ShellHandler};
use jobsched_worker::{execute, JobContext, JobHandler};
use serde_json::{json, Value};

/// True once `pid` no longer runs (gone, or a zombie waiting for its
/// parent — it runs no code any more either way).
fn pid_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')).unwrap_or(true),
    }
}

async fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_pid(path: &std::path::Path) -> i32 {
    std::fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

// ----- shell -----------------------------------------------------------------

#[tokio::test]
async fn shell_success_captures_output_env_and_cwd() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = JobContext::new(
        "shell",
        json!({
            "program": "sh",
            "args": ["-c", "echo \"$GREETING\"; pwd; echo warn >&2"],
            "env": {"GREETING": "hello"},
            "cwd": dir.path(),
        }),
    );
    let result = ShellHandler.execute(ctx).await.unwrap().unwrap();
    let cwd = dir.path().canonicalize().unwrap();
    assert_eq!(result["exitCode"], 0);
    assert_eq!(result["stdout"], format!("hello\n{}\n", cwd.display()));
    assert_eq!(result["stderr"], "warn\n");
}

#[tokio::test]
async fn shell_without_shell_does_not_interpolate() {
    let ctx = JobContext::new("shell", json!({"program": "echo", "args": ["$HOME", "a;b", "`id`"]}));
    let result = ShellHandler.execute(ctx).await.unwrap().unwrap();
    assert_eq!(result["stdout"], "$HOME a;b `id`\n");
}

#[tokio::test]
async fn shell_mode_passes_args_as_positional_parameters() {
    let ctx = JobContext::new("shell", json!({"shell": true, "command": "echo \"$1-$2\"", "args": ["x y", "z"]}));
    let result = ShellHandler.execute(ctx).await.unwrap().unwrap();
    assert_eq!(result["stdout"], "x y-z\n");
}

#[tokio::test]
async fn shell_nonzero_exit_is_a_failure_with_stderr() {
    let ctx = JobContext::new("shell", json!({"shell": true, "command": "echo partial; echo oops >&2; exit 3"}));
    let err = ShellHandler.execute(ctx).await.unwrap_err();
    assert_eq!(err.message(), "exit code 3; stderr: oops");
}

#[tokio::test]
async fn shell_bad_payloads_fail_cleanly() {
    for payload in [json!("ls"), json!({"args": ["x"]}), json!({"shell": true}), json!({"program": 5})] {
        let err = ShellHandler.execute(JobContext::new("shell", payload.clone())).await.unwrap_err();
        assert!(err.message().starts_with("invalid shell payload"), "{payload}: {err}");
    }
    let err =
        ShellHandler.execute(JobContext::new("shell", json!({"program": "/nonexistent/program"}))).await.unwrap_err();
    assert!(err.message().starts_with("cannot start the process"), "{err}");
}

#[tokio::test]
async fn shell_keeps_only_the_last_4k_of_output() {
    let ctx = JobContext::new(
        "shell",
        json!({"shell": true, "command": "head -c 100000 /dev/zero | tr '\\0' a; printf END"}),
    );
    let result = ShellHandler.execute(ctx).await.unwrap().unwrap();
    let out = result["stdout"].as_str().unwrap();
    assert_eq!(out.len(), 4096);
    assert!(out.ends_with("aaaEND"));
}

#[tokio::test]
async fn shell_timeout_kills_the_child_and_its_grandchild() {
    let dir = tempfile::tempdir().unwrap();
    let (child_file, grand_file) = (dir.path().join("child"), dir.path().join("grand"));
    let script = format!(
        "echo $$ > {c}.tmp && mv {c}.tmp {c}; sleep 300 & echo $! > {g}.tmp && mv {g}.tmp {g}; wait",
        c = child_file.display(),
        g = grand_file.display()
    );
    let ctx = JobContext::new("shell", json!({"shell": true, "command": script}));
    let handler: jobsched_worker::SharedHandler = Arc::new(ShellHandler);
    let run = tokio::spawn(execute(handler, ctx, Some(Duration::from_millis(1500))));

    wait_until("the script wrote both pids", Duration::from_secs(5), || grand_file.exists()).await;
    let (child, grand) = (read_pid(&child_file), read_pid(&grand_file));
    assert!(!pid_gone(child) && !pid_gone(grand), "both processes run before the timeout");

    let started = Instant::now();
    let exec = run.await.unwrap();
    assert!(exec.timed_out);
    assert!(exec.result.is_err());
    assert!(started.elapsed() < Duration::from_secs(3), "cancellation is prompt");
    wait_until("child gone", Duration::from_secs(5), || pid_gone(child)).await;
    wait_until("grandchild gone", Duration::from_secs(5), || pid_gone(grand)).await;
}

#[tokio::test]
async fn shell_cancellation_kills_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let grand_file = dir.path().join("grand");
    let script = format!("sleep 300 & echo $! > {g}.tmp && mv {g}.tmp {g}; wait", g = grand_file.display());
    let ctx = JobContext::new("shell", json!({"shell": true, "command": script}));
    let cancel = ctx.cancel.clone();
    let run = tokio::spawn(async move { ShellHandler.execute(ctx).await });
    wait_until("pid file", Duration::from_secs(5), || grand_file.exists()).await;
    let grand = read_pid(&grand_file);
    cancel.cancel();
    let err = tokio::time::timeout(Duration::from_secs(3), run).await.unwrap().unwrap().unwrap_err();
    assert_eq!(err.message(), "cancelled");
    wait_until("grandchild gone", Duration::from_secs(5), || pid_gone(grand)).await;
}

#[tokio::test]
async fn shell_background_leftovers_die_when_the_job_ends() {
    let dir = tempfile::tempdir().unwrap();
    let grand_file = dir.path().join("grand");
    // The script exits at once, leaving a background sleep holding stdout.
    let script = format!("sleep 300 & echo $! > {g}.tmp && mv {g}.tmp {g}; echo done", g = grand_file.display());
    let started = Instant::now();
    let result = ShellHandler
        .execute(JobContext::new("shell", json!({"shell": true, "command": script})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(result["stdout"], "done\n");
    assert!(started.elapsed() < Duration::from_secs(3));
    let grand = read_pid(&grand_file);
    wait_until("leftover gone", Duration::from_secs(5), || pid_gone(grand)).await;
}

// ----- http ------------------------------------------------------------------

async fn http_stub() -> String {
    let app = Router::new()
        .route("/ok", get(|| async { "hello" }))
        .route(
            "/echo",
            post(|headers: HeaderMap, body: Bytes| async move {
                let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let custom = headers.get("x-custom").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                format!("{ct}|{custom}|{}", String::from_utf8_lossy(&body))
            }),
        )
        .route("/fail", get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "broken") }))
        .route("/big", get(|| async { format!("{}END", "x".repeat(100_000)) }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn http_handler() -> HttpHandler {
    HttpHandler::new(reqwest::Client::new())
}

#[tokio::test]
async fn http_get_success() {
    let base = http_stub().await;
    let r = http_handler().execute(JobContext::new("http", json!({"url": format!("{base}/ok")}))).await.unwrap();
    assert_eq!(r, Some(json!({"status": 200, "body": "hello"})));
}

#[tokio::test]
async fn http_post_json_and_text_bodies_with_headers() {
    let base = http_stub().await;
    let r = http_handler()
        .execute(JobContext::new(
            "http",
            json!({"url": format!("{base}/echo"), "headers": {"X-Custom": "v1"}, "body": {"a": 1}}),
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r["body"], r#"application/json|v1|{"a":1}"#);

    let r = http_handler()
        .execute(JobContext::new(
            "http",
            json!({"url": format!("{base}/echo"), "method": "post", "headers": {"content-type": "text/plain"}, "body": "raw"}),
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r["body"], "text/plain||raw");
}

#[tokio::test]
async fn http_non_2xx_is_a_failure() {
    let base = http_stub().await;
    let err =
        http_handler().execute(JobContext::new("http", json!({"url": format!("{base}/fail")}))).await.unwrap_err();
    assert_eq!(err.message(), "HTTP 500: broken");
    let err =
        http_handler().execute(JobContext::new("http", json!({"url": format!("{base}/missing")}))).await.unwrap_err();
    assert!(err.message().starts_with("HTTP 404"), "{err}");
}

#[tokio::test]
async fn http_keeps_the_body_tail_and_rejects_bad_payloads() {
    let base = http_stub().await;
    let r =
        http_handler().execute(JobContext::new("http", json!({"url": format!("{base}/big")}))).await.unwrap().unwrap();
    let body = r["body"].as_str().unwrap();
    assert_eq!(body.len(), 4096);
    assert!(body.ends_with("xEND"));

    for payload in
        [json!({}), json!({"url": "not a url"}), json!({"url": format!("{base}/ok"), "method": "BAD METHOD"})]
    {
        let err = http_handler().execute(JobContext::new("http", payload.clone())).await.unwrap_err();
        assert!(err.message().starts_with("invalid http payload"), "{payload}: {err}");
    }
    // Nothing listens on port 1.
    let err = http_handler().execute(JobContext::new("http", json!({"url": "http://127.0.0.1:1/"}))).await.unwrap_err();
    assert!(err.message().starts_with("request failed"), "{err}");
}

#[tokio::test]
async fn http_request_is_cancellable() {
    let base = http_stub().await;
    let ctx = JobContext::new("http", json!({"url": format!("{base}/slow")}));
    let cancel = ctx.cancel.clone();
    let run = tokio::spawn(async move { http_handler().execute(ctx).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    cancel.cancel();
    let err = tokio::time::timeout(Duration::from_secs(2), run).await.unwrap().unwrap().unwrap_err();
    assert_eq!(err.message(), "cancelled");
}

#[tokio::test]
async fn http_payload_timeout() {
    let base = http_stub().await;
    let err = http_handler()
        .execute(JobContext::new("http", json!({"url": format!("{base}/slow"), "timeoutSeconds": 0.3})))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("request failed"), "{err}");
}

// ----- echo, fail, sample ----------------------------------------------------

#[tokio::test]
async fn echo_returns_the_payload() {
    let payload = json!({"a": [1, 2, {"b": null}]});
    assert_eq!(EchoHandler.execute(JobContext::new("echo", payload.clone())).await.unwrap(), Some(payload));
}

#[tokio::test]
async fn fail_uses_the_message() {
    let err = FailHandler.execute(JobContext::new("fail", json!({"message": "nope"}))).await.unwrap_err();
    assert_eq!(err.message(), "nope");
    let err = FailHandler.execute(JobContext::new("fail", Value::Null)).await.unwrap_err();
    assert_eq!(err.message(), "fail handler");
}

#[tokio::test]
async fn sample_sleeps_the_duration() {
    let started = Instant::now();
    let r = SampleHandler.execute(JobContext::new("sample", json!({"durationMs": 100}))).await.unwrap();
    assert_eq!(r, Some(json!({"sleptMs": 100})));
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn sample_is_cancellable() {
    let ctx = JobContext::new("sample", json!("not an object: default 5 s"));
    let cancel = ctx.cancel.clone();
    let started = Instant::now();
    let run = tokio::spawn(async move { SampleHandler.execute(ctx).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    cancel.cancel();
    let err = run.await.unwrap().unwrap_err();
    assert_eq!(err.message(), "cancelled");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn sample_under_execute_times_out() {
    let handler: jobsched_worker::SharedHandler = Arc::new(SampleHandler);
    let exec =
        execute(handler, JobContext::new("sample", json!({"durationMs": 60_000})), Some(Duration::from_millis(200)))
            .await;
    assert!(exec.timed_out);
    assert_eq!(exec.result.unwrap_err().message(), "cancelled");
}
