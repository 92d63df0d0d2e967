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
    /// Give node N its own loopback IP (127.0.X.(10+N)) and bind its
    /// outgoing node-to-node connections to it (`outbound_bind`), so that
    /// [`Cluster::partition`] can cut it off from its peers with iptables
    /// while the test still reaches it from 127.0.0.1. Needs root.
    pub split_ips: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            nodes: 3,
            worker_timeout_ms: 30_000,
            monitor_interval_ms: 200,
            snapshot_logs: 20_000,
            extra: Vec::new(),
            split_ips: false,
        }
    }
}

pub struct NodeProc {
    pub id: u64,
    pub ip: String,
    pub port: u16,
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl NodeProc {
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, NodeProc>,
    pub http: reqwest::Client,
    /// The iptables chain of this cluster's partitions, once created.
    firewall_chain: Option<String>,
}

impl Cluster {
    /// Start `opts.nodes` nodes and wait until every one is ready.
    pub async fn start(opts: Opts) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<u16> = (0..opts.nodes).map(|_| free_port()).collect();
        // A third octet of its own per cluster (from its first free port) so
        // that tests running side by side never share IPs or rules.
        let octet = 100 + ports[0] % 150;
        let ips: Vec<String> = (0..opts.nodes)
            .map(|i| if opts.split_ips { format!("127.0.{octet}.{}", 11 + i) } else { "127.0.0.1".to_owned() })
            .collect();
        let peers: Vec<String> = ports
            .iter()
            .zip(&ips)
            .enumerate()
            .map(|(i, (p, ip))| format!("{{ id = {}, addr = \"{ip}:{p}\" }}", i + 1))
            .collect();
        let mut nodes = BTreeMap::new();
        for (i, port) in ports.iter().enumerate() {
            let id = i as u64 + 1;
            let ndir = dir.path().join(format!("node{id}"));
            std::fs::create_dir_all(&ndir).expect("node dir");
            let mut cfg = format!(
                "node_id = {id}\nlisten = \"{}:{port}\"\ndata_dir = \"{}\"\npeers = [{}]\n\
                 worker_timeout_ms = {}\nmonitor_interval_ms = {}\nsnapshot_logs = {}\nlog_filter = \"info,openraft=warn\"\n",
                ips[i],
                ndir.join("data").display(),
                peers.join(", "),
                opts.worker_timeout_ms,
                opts.monitor_interval_ms,
                opts.snapshot_logs,
            );
            if opts.split_ips {
                cfg.push_str(&format!("outbound_bind = \"{}\"\n", ips[i]));
            }
            for (k, v) in &opts.extra {
                cfg.push_str(&format!("{k} = {v}\n"));
            }
            let config = ndir.join("node.toml");
            std::fs::write(&config, cfg).expect("write config");
            nodes.insert(id, NodeProc { id, ip: ips[i].clone(), port: *port, child: None, dir: ndir, config });
        }
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
        let mut c = Cluster { dir, nodes, http, firewall_chain: None };
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

    /// Cut node `id` off from its peers in both directions (iptables DROP
    /// between its IP and theirs: packets vanish, connections time out).
    /// Clients on 127.0.0.1 still reach every node. Needs `split_ips`.
    pub fn partition(&mut self, id: u64) {
        let chain = match &self.firewall_chain {
            Some(c) => c.clone(),
            None => {
                let c = format!("JSCHED-T-{}", self.nodes[&1].port);
                iptables(&["-N", &c]);
                iptables(&["-I", "INPUT", "-j", &c]);
                iptables(&["-I", "OUTPUT", "-j", &c]);
                self.firewall_chain = Some(c.clone());
                c
            }
        };
        let me = self.nodes[&id].ip.clone();
        assert_ne!(me, "127.0.0.1", "partition needs Opts::split_ips");
        for (other, n) in &self.nodes {
            if *other != id {
                iptables(&["-A", &chain, "-s", &me, "-d", &n.ip, "-j", "DROP"]);
                iptables(&["-A", &chain, "-s", &n.ip, "-d", &me, "-j", "DROP"]);
            }
        }
    }

    /// Remove every partition.
    pub fn heal(&mut self) {
        if let Some(c) = &self.firewall_chain {
            iptables(&["-F", c]);
        }
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

    /// SIGSTOP a node and wait until the kernel reports it stopped.
    pub fn pause(&self, id: u64) {
        if let Some(pid) = self.nodes[&id].pid() {
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            for _ in 0..200 {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // Field 3, after the parenthesised command name, is the state.
                if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('T')) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
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

    /// Wait until every node runs, all have applied the same index, and their
    /// state digests are equal.
    pub async fn assert_digests_equal(&self) {
        let index = self.max_applied().await;
        self.wait_applied(index, Duration::from_secs(30)).await;
        eventually(Duration::from_secs(30), "equal digests on every node", || async {
            let mut seen = std::collections::BTreeSet::new();
            let mut indexes = std::collections::BTreeSet::new();
            for node in self.running() {
                let d = self.digest(node).await;
                seen.insert(d["digest"].as_str().unwrap_or("").to_owned());
                indexes.insert(d["appliedIndex"].as_u64());
            }
            (seen.len() == 1 && indexes.len() == 1 && self.running().len() == self.nodes.len()).then_some(())
        })
        .await;
    }

    /// GET `path` from the first running node that answers 200.
    pub async fn get_any(&self, path: &str) -> Option<Value> {
        for node in self.running() {
            let r = self.http.get(format!("{}{path}", self.url(node))).timeout(Duration::from_secs(5)).send().await;
            if let Ok(r) = r {
                if r.status().as_u16() == 200 {
                    return r.json().await.ok();
                }
            }
        }
        None
    }

    pub async fn digest(&self, id: u64) -> Value {
        self.get(id, "/api/debug/digest").await.1
    }
}

fn iptables(args: &[&str]) {
    let out = Command::new("iptables").args(args).output().expect("run iptables (partitions need it, and root)");
    assert!(out.status.success(), "iptables {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(c) = self.firewall_chain.take() {
            for args in [vec!["-D", "INPUT", "-j", &c], vec!["-D", "OUTPUT", "-j", &c], vec!["-F", &c], vec!["-X", &c]]
            {
                let _ = Command::new("iptables").args(&args).output();
            }
        }
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

/// Settings of one `jobsched-worker` process started by
/// [`Cluster::spawn_worker`]. Short defaults suit tests; every field maps to
/// the flag of the same name.
#[derive(Clone, Debug)]
pub struct WorkerOpts {
    /// `--name`; also names the log file (`worker-<name>.log`).
    pub name: String,
    pub capacity: u32,
    /// `--job-types`; empty: the binary's default (every built-in).
    pub job_types: Vec<String>,
    pub lease_seconds: u64,
    pub heartbeat_interval_seconds: f64,
    pub poll_wait_seconds: f64,
    pub drain_timeout_seconds: f64,
    pub request_timeout_seconds: f64,
    /// `RUST_LOG` of the worker (its log is JSON, one event a line).
    pub rust_log: String,
}

impl WorkerOpts {
    pub fn new(name: &str) -> WorkerOpts {
        WorkerOpts {
            name: name.to_owned(),
            capacity: 4,
            job_types: Vec::new(),
            lease_seconds: 10,
            heartbeat_interval_seconds: 1.0,
            poll_wait_seconds: 5.0,
            drain_timeout_seconds: 5.0,
            request_timeout_seconds: 5.0,
            rust_log: "info".to_owned(),
        }
    }

    pub fn job_types(mut self, types: &[&str]) -> Self {
        self.job_types = types.iter().map(|t| t.to_string()).collect();
        self
    }

    pub fn capacity(mut self, capacity: u32) -> Self {
        self.capacity = capacity;
        self
    }

    /// Lease length and heartbeat interval together (the worker requires the
    /// heartbeat to come at least twice per lease).
    pub fn lease(mut self, lease_seconds: u64, heartbeat_interval_seconds: f64) -> Self {
        self.lease_seconds = lease_seconds;
        self.heartbeat_interval_seconds = heartbeat_interval_seconds;
        self
    }
}

/// A `jobsched-worker` process. Killed (SIGCONT + SIGKILL) when dropped; its
/// log tail is printed when the test is failing.
pub struct WorkerProc {
    /// The worker id it registers under (`--worker-id`).
    pub id: String,
    pub name: String,
    pub child: Option<Child>,
    pub log_path: PathBuf,
}

impl Cluster {
    /// Comma-separated base URLs of all nodes (running or not).
    pub fn coordinators(&self) -> String {
        self.nodes.values().map(NodeProc::url).collect::<Vec<_>>().join(",")
    }

    /// Start a `jobsched-worker` process pointed at every node.
    pub fn spawn_worker(&self, opts: &WorkerOpts) -> WorkerProc {
        let id = uuid::Uuid::new_v4().to_string();
        let log_path = self.dir.path().join(format!("worker-{}.log", opts.name));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("worker log file");
        let mut cmd = Command::new(bin("jobsched-worker"));
        cmd.arg("--coordinators")
            .arg(self.coordinators())
            .arg("--worker-id")
            .arg(&id)
            .arg("--name")
            .arg(&opts.name)
            .arg("--capacity")
            .arg(opts.capacity.to_string())
            .arg("--lease-seconds")
            .arg(opts.lease_seconds.to_string())
            .arg("--heartbeat-interval-seconds")
            .arg(opts.heartbeat_interval_seconds.to_string())
            .arg("--poll-wait-seconds")
            .arg(opts.poll_wait_seconds.to_string())
            .arg("--drain-timeout-seconds")
            .arg(opts.drain_timeout_seconds.to_string())
            .arg("--request-timeout-seconds")
            .arg(opts.request_timeout_seconds.to_string())
            .arg("--log-format")
            .arg("json");
        if !opts.job_types.is_empty() {
            cmd.arg("--job-types").arg(opts.job_types.join(","));
        }
        for (k, _) in std::env::vars() {
            if k.starts_with("JOBSCHED_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .env("RUST_LOG", &opts.rust_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn worker");
        WorkerProc { id, name: opts.name.clone(), child: Some(child), log_path }
    }
}

impl WorkerProc {
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// `kill -9` and reap. Like a real `kill -9`, it leaves the processes of
    /// running `shell` jobs behind (they have their own process groups).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Still running (not exited)?
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Wait (polling) for the process to exit; panics after `max`.
    pub async fn wait_exit(&mut self, max: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("worker process");
        let deadline = tokio::time::Instant::now() + max;
        loop {
            if let Some(st) = c.try_wait().expect("try_wait") {
                return st;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("worker {} did not exit within {max:?}; log:\n{}", self.name, self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then wait for the exit.
    pub async fn stop(&mut self, max: Duration) -> std::process::ExitStatus {
        self.sigterm();
        self.wait_exit(max).await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The log's JSON events, in order (lines that are not JSON are skipped).
    pub fn events(&self) -> Vec<Value> {
        self.log().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Events with this message logged inside the `job` span of `job_id`.
    pub fn job_events(&self, job_id: &str, message: &str) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["message"] == message && event_job_id(e) == Some(job_id)).collect()
    }
}

/// The job id of the `job` span an event was logged in, if any.
pub fn event_job_id(e: &Value) -> Option<&str> {
    e["spans"].as_array()?.iter().find(|s| s["name"] == "job").and_then(|s| s["job_id"].as_str())
}

impl Drop for WorkerProc {
    /// Stops a worker the test left running. Jobs' processes run in their
    /// own process groups and would outlive a SIGKILL of the worker, so first
    /// use the binary's own fast exit: a second SIGTERM kills them and exits.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id() as i32;
            let running = |c: &mut Child| matches!(c.try_wait(), Ok(None));
            unsafe { libc::kill(pid, libc::SIGCONT) };
            if running(&mut c) {
                unsafe { libc::kill(pid, libc::SIGTERM) };
                // The second signal counts only once the first was handled.
                let until = std::time::Instant::now() + Duration::from_secs(1);
                while running(&mut c) && !self.log().contains("shutdown signal") && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let until = std::time::Instant::now() + Duration::from_secs(2);
                while running(&mut c) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- worker {} log tail ----", self.name);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
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
