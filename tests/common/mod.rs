//! Test harness: runs a real coordinator cluster as separate processes on
//! 127.0.0.1 with free ports and temporary data directories, and talks to it
//! over HTTP. Nodes can be killed (-9), stopped, paused and restarted.
//!
//! The binaries come from the same cargo target directory as the test
//! executable (`cargo build --bins` must have run; `scripts/test.sh` does).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// Directory holding the workspace binaries (target/<profile>).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-binary>
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --bins` first (scripts/test.sh does)", p.display());
    p
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0").local_addr().expect("addr").port()
}

/// Tunables written into every node's config file.
#[derive(Clone, Debug)]
pub struct Opts {
    pub nodes: usize,
    pub worker_timeout_ms: u64,
    pub monitor_interval_ms: u64,
    pub snapshot_logs: u64,
    pub extra: Vec<(String, String)>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { nodes: 3, worker_timeout_ms: 30_000, monitor_interval_ms: 200, snapshot_logs: 20_000, extra: Vec::new() }
    }
}

pub struct NodeProc {
    pub id: u64,
    pub port: u16,
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl NodeProc {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, NodeProc>,
    pub http: reqwest::Client,
}

impl Cluster {
    /// Start `opts.nodes` nodes and wait until every one is ready.
    pub async fn start(opts: Opts) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<u16> = (0..opts.nodes).map(|_| free_port()).collect();
        let peers: Vec<String> =
            ports.iter().enumerate().map(|(i, p)| format!("{{ id = {}, addr = \"127.0.0.1:{p}\" }}", i + 1)).collect();
        let mut nodes = BTreeMap::new();
        for (i, port) in ports.iter().enumerate() {
            let id = i as u64 + 1;
            let ndir = dir.path().join(format!("node{id}"));
            std::fs::create_dir_all(&ndir).expect("node dir");
            let mut cfg = format!(
                "node_id = {id}\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\npeers = [{}]\n\
                 worker_timeout_ms = {}\nmonitor_interval_ms = {}\nsnapshot_logs = {}\nlog_filter = \"info,openraft=warn\"\n",
                ndir.join("data").display(),
                peers.join(", "),
                opts.worker_timeout_ms,
                opts.monitor_interval_ms,
                opts.snapshot_logs,
            );
            for (k, v) in &opts.extra {
                cfg.push_str(&format!("{k} = {v}\n"));
            }
            let config = ndir.join("node.toml");
            std::fs::write(&config, cfg).expect("write config");
            nodes.insert(id, NodeProc { id, port: *port, child: None, dir: ndir, config });
        }
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
        let mut c = Cluster { dir, nodes, http };
        let ids: Vec<u64> = c.nodes.keys().copied().collect();
        for id in ids {
            c.start_node(id);
        }
        c.wait_ready(Duration::from_secs(60)).await;
        c
    }

    pub fn start_node(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).expect("node id");
        assert!(n.child.is_none(), "node {id} already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(n.dir.join("node.log")).expect("log file");
        let child = Command::new(bin("jobsched-coordinator"))
            .arg("--config")
            .arg(&n.config)
            .env_remove("JOBSCHED_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn coordinator");
        n.child = Some(child);
    }

    /// `kill -9` a node and reap it.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.nodes.get_mut(&id).and_then(|n| n.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let mut c = self.nodes.get_mut(&id).and_then(|n| n.child.take())?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        for _ in 0..200 {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    pub fn pause(&self, id: u64) {
        if let Some(pid) = self.nodes[&id].pid() {
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
    }

    pub fn resume(&self, id: u64) {
        if let Some(pid) = self.nodes[&id].pid() {
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }

    pub fn url(&self, id: u64) -> String {
        self.nodes[&id].url()
    }

    pub fn running(&self) -> Vec<u64> {
        self.nodes.values().filter(|n| n.child.is_some()).map(|n| n.id).collect()
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.nodes[&id].dir.join("node.log")).unwrap_or_default()
    }

    /// Wait until every running node answers /ready.
    pub async fn wait_ready(&self, max: Duration) {
        let deadline = tokio::time::Instant::now() + max;
        for id in self.running() {
            loop {
                let ok = self
                    .http
                    .get(format!("{}/ready", self.url(id)))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    panic!("node {id} not ready in {max:?}; log:\n{}", self.log(id));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    pub async fn cluster_view(&self, id: u64) -> Option<Value> {
        let r =
            self.http.get(format!("{}/api/cluster", self.url(id))).timeout(Duration::from_secs(2)).send().await.ok()?;
        r.json().await.ok()
    }

    /// The leader id agreed by the running nodes, waiting up to `max`.
    pub async fn leader(&self, max: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            for id in self.running() {
                if let Some(v) = self.cluster_view(id).await {
                    if v["role"] == "Leader" {
                        return id;
                    }
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!("no leader within {max:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn follower(&self) -> u64 {
        let l = self.leader(Duration::from_secs(20)).await;
        *self.running().iter().find(|id| **id != l).expect("a follower")
    }

    /// Wait until every running node has applied at least `index`.
    pub async fn wait_applied(&self, index: u64, max: Duration) {
        let deadline = tokio::time::Instant::now() + max;
        for id in self.running() {
            loop {
                let applied = self.cluster_view(id).await.and_then(|v| v["lastAppliedIndex"].as_u64()).unwrap_or(0);
                if applied >= index {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    panic!("node {id} applied {applied} < {index} after {max:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    pub async fn max_applied(&self) -> u64 {
        let mut m = 0;
        for id in self.running() {
            m = m.max(self.cluster_view(id).await.and_then(|v| v["lastAppliedIndex"].as_u64()).unwrap_or(0));
        }
        m
    }

    pub async fn post(&self, id: u64, path: &str, body: Value) -> (u16, Value) {
        let r = self.http.post(format!("{}{path}", self.url(id))).json(&body).send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, id: u64, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url(id)))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, id: u64, path: &str) -> (u16, Value) {
        let r = self.http.get(format!("{}{path}", self.url(id))).send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn submit(&self, id: u64, job_type: &str, extra: Value) -> Value {
        let mut body = json!({"name": format!("{job_type} job"), "type": job_type, "payload": {"n": 1}});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (st, v) = self.post(id, "/api/jobs", body).await;
        assert_eq!(st, 201, "submit failed: {v}");
        v
    }

    pub async fn register_worker(&self, id: u64, types: &[&str], capacity: u32) -> String {
        let (st, v) = self
            .post(id, "/api/workers/register", json!({"name": "test-worker", "capacity": capacity, "jobTypes": types}))
            .await;
        assert_eq!(st, 201, "register failed: {v}");
        v["id"].as_str().expect("worker id").to_owned()
    }

    pub async fn digest(&self, id: u64) -> Value {
        self.get(id, "/api/debug/digest").await.1
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in self.nodes.values_mut() {
            if let Some(mut c) = n.child.take() {
                unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            for n in self.nodes.values() {
                let log = std::fs::read_to_string(n.dir.join("node.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- node {} log tail ----", n.id);
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Poll `f` until it returns Some, or panic after `max`.
pub async fn eventually<T, F, Fut>(max: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + max;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {max:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
