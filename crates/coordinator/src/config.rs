//! Node configuration: defaults, then a TOML file, then `JOBSCHED_*`
//! environment variables, then command-line flags (later wins).
//!
//! Every field is documented with its unit and default here and in the README;
//! [`Config::validate`] rejects inconsistent values at start-up, naming the key.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Raft node id (unique, never reused after wiping a node's data).
    pub id: u64,
    /// `host:port` where that node's HTTP server (API + Raft RPC) listens.
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's Raft id. Required.
    pub node_id: u64,
    /// Socket address the HTTP server binds (API and Raft RPC). Default 127.0.0.1:5001.
    pub listen: SocketAddr,
    /// Address other nodes and clients use to reach this node; default: `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Directory for the RocksDB database and snapshots. Default `data/node<id>`.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// The initial cluster membership, this node included. Every node must be
    /// given the same list. Empty: a single-node cluster of this node.
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// Raft leader heartbeat, milliseconds. Default 100. openraft 0.9 also uses it as
    /// the append RPC timeout, so it must cover a follower fsync under load.
    pub heartbeat_ms: u64,
    /// Election timeout range, milliseconds. Default 250..400.
    ///
    /// Failover arithmetic (openraft 0.9): a follower that knew a leader waits
    /// its leader lease (= election_max_ms) plus a random election timeout in
    /// this range before campaigning, so a dead leader is replaced after
    /// 650-800 ms with the defaults, plus one vote round and one commit.
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot (and purge older log) after this many entries. Default 20000.
    pub snapshot_logs: u64,
    /// Entries kept in the log behind the latest snapshot, so that a follower
    /// that was away (restarted, partitioned) catches up from the log instead
    /// of installing a whole snapshot. Default 50000 (like etcd's
    /// `--snapshot-catchup-entries`). Why this large: a snapshot install
    /// copies the whole state (seconds with millions of jobs) and the node
    /// cannot acknowledge appends meanwhile, whereas log entries are appended
    /// (fsynced, so they count towards the quorum) while apply catches up.
    /// Costs disk only: the log lives in RocksDB, not in memory.
    pub snapshot_catchup_logs: u64,
    /// A worker without a heartbeat for this long is declared dead and its
    /// jobs are re-queued, milliseconds. Default 30000.
    pub worker_timeout_ms: u64,
    /// How often the leader's monitors run, milliseconds. Default 1000.
    pub monitor_interval_ms: u64,
    /// Completed and Dead jobs are deleted this long after they finished,
    /// seconds. Default 604800 (7 days).
    pub retention_secs: u64,
    /// How long a write may wait for commit before the client gets 503
    /// (outcome unknown), milliseconds. Default 10000.
    pub propose_timeout_ms: u64,
    /// Most commands the leader packs into one Raft entry. Default 256.
    pub max_batch: usize,
    /// Largest request body, bytes. Default 1048576.
    pub max_body_bytes: usize,
    /// Followers send their relays to the leader in batches (one message on
    /// a peer stream carries all queued ones; see `http::relay_batch`).
    /// `false`: one HTTP request per relay, for comparison. Default true.
    #[serde(default = "default_true")]
    pub relay_batching: bool,
    /// Elections run by our own timer with a pre-vote round
    /// (`jobsched_raft::election`): a fresh random timeout every round, and
    /// a node that could not win (cut off, shorter log) never raises the
    /// term. `false`: openraft's own election timer. Default true.
    #[serde(default = "default_true")]
    pub pre_vote: bool,
    /// Local IP that outgoing node-to-node connections (Raft RPCs, relays
    /// to the leader) are bound to; default: none (the OS picks). Chaos runs
    /// give each node its own loopback IP so firewall rules can cut one
    /// node off from its peers while clients still reach it.
    #[serde(default)]
    pub outbound_bind: Option<IpAddr>,
    /// Threads of the node's async runtime (HTTP, Raft, apply of small
    /// entries). 0, the default, means one per CPU core; 1 means a
    /// single-threaded runtime (tokio's current-thread scheduler: every task
    /// on the main thread, no work-stealing machinery). Why it is a knob:
    /// when several nodes share a machine's cores (a local cluster, the
    /// benchmarks), each extra runtime thread mostly adds wake-ups between
    /// threads (futex, context switches) instead of parallelism; see
    /// docs/benchmarks.md items 14 and 33. Blocking work (fsync, big
    /// applies, snapshots) runs on separate threads either way.
    #[serde(default)]
    pub runtime_threads: usize,
    /// Log format: "text" or "json". Default text.
    pub log_format: String,
    /// tracing filter, e.g. "info,openraft=warn". Default "info,openraft=warn".
    pub log_filter: String,
}

fn default_true() -> bool {
    true
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 0,
            listen: "127.0.0.1:5001".parse().expect("literal address"),
            advertise: None,
            data_dir: None,
            peers: Vec::new(),
            heartbeat_ms: 100,
            election_min_ms: 250,
            election_max_ms: 400,
            snapshot_logs: 20_000,
            snapshot_catchup_logs: 50_000,
            worker_timeout_ms: 30_000,
            monitor_interval_ms: 1_000,
            retention_secs: 7 * 24 * 3600,
            propose_timeout_ms: 10_000,
            max_batch: 256,
            max_body_bytes: 1 << 20,
            relay_batching: true,
            pre_vote: true,
            outbound_bind: None,
            runtime_threads: 0,
            log_format: "text".into(),
            log_filter: "info,openraft=warn".into(),
        }
    }
}

/// Command-line overrides (each also settable by its environment variable).
#[derive(Debug, Clone, Default, clap::Parser, Serialize)]
#[command(name = "jobsched-coordinator", about = "Coordinator node of the jobsched cluster")]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long, short, env = "JOBSCHED_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Local IP for outgoing node-to-node connections.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound_bind: Option<IpAddr>,
    /// "text" or "json".
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<Subcommand>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Subcommand {
    /// Exit 0 if the node at ADDR answers /health (for container health checks).
    Healthcheck {
        /// host:port of the node; default: this config's advertise address.
        addr: Option<String>,
    },
}

/// Config keys that may be set as `JOBSCHED_<KEY>` environment variables.
const ENV_KEYS: [&str; 22] = [
    "node_id",
    "listen",
    "advertise",
    "data_dir",
    "peers",
    "heartbeat_ms",
    "election_min_ms",
    "election_max_ms",
    "snapshot_logs",
    "snapshot_catchup_logs",
    "worker_timeout_ms",
    "monitor_interval_ms",
    "retention_secs",
    "propose_timeout_ms",
    "max_batch",
    "max_body_bytes",
    "relay_batching",
    "pre_vote",
    "outbound_bind",
    "runtime_threads",
    "log_format",
    "log_filter",
];

impl Config {
    /// Load defaults <- file <- env <- flags, then validate.
    pub fn load(flags: &Flags) -> Result<Config, String> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &flags.config {
            if !path.exists() {
                return Err(format!("config file {} does not exist", path.display()));
            }
            fig = fig.merge(Toml::file(path));
        }
        fig = fig
            // Only this file's keys: other tools read JOBSCHED_* variables too.
            .merge(Env::prefixed("JOBSCHED_").only(&ENV_KEYS))
            .merge(Serialized::defaults(flags));
        let cfg: Config = fig.extract().map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.node_id == 0 {
            return Err("node_id: must be set and non-zero".into());
        }
        if self.heartbeat_ms == 0 || self.election_min_ms <= self.heartbeat_ms * 2 {
            return Err("election_min_ms: must exceed 2 x heartbeat_ms (and heartbeat_ms > 0)".into());
        }
        if self.election_max_ms <= self.election_min_ms {
            return Err("election_max_ms: must exceed election_min_ms".into());
        }
        if !self.peers.is_empty() && !self.peers.iter().any(|p| p.id == self.node_id) {
            return Err("peers: must include this node's node_id".into());
        }
        let mut ids: Vec<u64> = self.peers.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.peers.len() || ids.contains(&0) {
            return Err("peers: ids must be unique and non-zero".into());
        }
        if self.worker_timeout_ms < 1000 {
            return Err("worker_timeout_ms: must be at least 1000".into());
        }
        if self.monitor_interval_ms == 0 {
            return Err("monitor_interval_ms: must be positive".into());
        }
        if self.max_batch == 0 {
            return Err("max_batch: must be positive".into());
        }
        if self.max_body_bytes < 4096 {
            return Err("max_body_bytes: must be at least 4096".into());
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err("log_format: must be \"text\" or \"json\"".into());
        }
        Ok(())
    }

    pub fn advertise_addr(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("data/node{}", self.node_id)))
    }

    /// The membership to initialise with: the peers, or just this node.
    pub fn members(&self) -> Vec<Peer> {
        if self.peers.is_empty() {
            vec![Peer { id: self.node_id, addr: self.advertise_addr() }]
        } else {
            self.peers.clone()
        }
    }

    pub fn worker_timeout(&self) -> Duration {
        Duration::from_millis(self.worker_timeout_ms)
    }
}
