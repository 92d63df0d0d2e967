//! Worker configuration: [`WorkerConfig`], its command-line flags
//! ([`WorkerArgs`]) and the layered loader [`load`].
//!
//! Precedence, lowest first: built-in defaults, the TOML file (`--config` /
//! `JOBSCHED_CONFIG`), environment variables `JOBSCHED_<FIELD>` (upper-case
//! field name, e.g. `JOBSCHED_CAPACITY`), command-line flags. Lists
//! (`coordinators`, `job_types`) may be given as a TOML array or as one
//! comma-separated string (the only form an environment variable has).
//!
//! Invariant: a [`WorkerConfig`] that passed [`WorkerConfig::validate`] can
//! run: every duration is finite and in range, the heartbeat comes at least
//! twice per lease, and the job types are non-empty.

use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use crate::builtin::BUILTIN_TYPES;

/// Prefix of the worker's environment variables.
pub const ENV_PREFIX: &str = "JOBSCHED_";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything the worker binary can be told. Durations are in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Coordinator base URLs. Default: `http://127.0.0.1:5001,5002,5003`.
    #[serde(deserialize_with = "string_or_list")]
    pub coordinators: Vec<String>,
    /// Worker name shown in listings. Default: `<hostname>-<pid>`.
    pub name: Option<String>,
    /// Register under this id (keeps the identity across restarts).
    /// Default: a new random id per start.
    pub worker_id: Option<Uuid>,
    /// Jobs run at once (1..=10000). Default 10.
    pub capacity: u32,
    /// Job types to run: names of built-in handlers. Default: all built-ins
    /// (`echo`, `sample`, `shell`, `http`, `fail`).
    #[serde(deserialize_with = "string_or_list")]
    pub job_types: Vec<String>,
    /// Seconds between heartbeats (> 0, at most half of `lease_seconds`).
    /// Default 5.
    pub heartbeat_interval_seconds: f64,
    /// Lease length asked for on acquire, in seconds (1..=86400); heartbeats
    /// extend it. Default 60.
    pub lease_seconds: u64,
    /// Long-poll wait of one acquire, in seconds (0..=60). Default 20.
    pub poll_wait_seconds: f64,
    /// On shutdown, how long running jobs may finish before they are
    /// cancelled and released, in seconds (>= 0). Default 30.
    pub drain_timeout_seconds: f64,
    /// Limit on one HTTP attempt against a coordinator, in seconds (> 0).
    /// Default 10.
    pub request_timeout_seconds: f64,
    /// `text` or `json`. Default text.
    pub log_format: LogFormat,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            coordinators: jobsched_client::parse_coordinators(jobsched_client::DEFAULT_COORDINATORS),
            name: None,
            worker_id: None,
            capacity: 10,
            job_types: BUILTIN_TYPES.iter().map(|s| s.to_string()).collect(),
            heartbeat_interval_seconds: 5.0,
            lease_seconds: 60,
            poll_wait_seconds: 20.0,
            drain_timeout_seconds: 30.0,
            request_timeout_seconds: 10.0,
            log_format: LogFormat::Text,
        }
    }
}

/// A configuration that cannot be used; the message names the key (and,
/// from [`load`], its source).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid worker configuration: {0}")]
pub struct ConfigError(pub String);

fn seconds(key: &str, v: f64, min: f64, max: f64) -> Result<Duration, ConfigError> {
    if !(v.is_finite() && v >= min && v <= max) {
        return Err(ConfigError(format!("{key} must be between {min} and {max} seconds, got {v}")));
    }
    Ok(Duration::from_secs_f64(v))
}

impl WorkerConfig {
    /// Check ranges and cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.coordinators.is_empty() {
            return Err(ConfigError("coordinators must list at least one URL".into()));
        }
        jobsched_client::Client::builder()
            .coordinators(&self.coordinators)
            .build()
            .map_err(|e| ConfigError(format!("coordinators: {e}")))?;
        if !(1..=10_000).contains(&self.capacity) {
            return Err(ConfigError(format!("capacity must be between 1 and 10000, got {}", self.capacity)));
        }
        if self.job_types.is_empty() || self.job_types.iter().any(|t| t.trim().is_empty()) {
            return Err(ConfigError("job_types must list at least one non-empty type".into()));
        }
        if !(1..=86_400).contains(&self.lease_seconds) {
            return Err(ConfigError(format!("lease_seconds must be between 1 and 86400, got {}", self.lease_seconds)));
        }
        let hb = seconds("heartbeat_interval_seconds", self.heartbeat_interval_seconds, 0.01, 3600.0)?;
        // Two heartbeats per lease: one lost heartbeat must not lose the lease.
        if hb.as_secs_f64() * 2.0 > self.lease_seconds as f64 {
            return Err(ConfigError(format!(
                "heartbeat_interval_seconds ({}) must be at most half of lease_seconds ({})",
                self.heartbeat_interval_seconds, self.lease_seconds
            )));
        }
        seconds("poll_wait_seconds", self.poll_wait_seconds, 0.0, jobsched_api::MAX_WAIT_SECONDS)?;
        seconds("drain_timeout_seconds", self.drain_timeout_seconds, 0.0, 86_400.0)?;
        seconds("request_timeout_seconds", self.request_timeout_seconds, 0.001, 3600.0)?;
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::try_from_secs_f64(self.heartbeat_interval_seconds).unwrap_or(Duration::from_secs(5))
    }

    pub fn poll_wait(&self) -> Duration {
        Duration::try_from_secs_f64(self.poll_wait_seconds).unwrap_or(Duration::from_secs(20))
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::try_from_secs_f64(self.drain_timeout_seconds).unwrap_or(Duration::from_secs(30))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::try_from_secs_f64(self.request_timeout_seconds).unwrap_or(Duration::from_secs(10))
    }
}

/// `<hostname>-<pid>`, the default worker name.
pub fn default_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `len` bytes; gethostname writes at most
    // that many and we stop at the first NUL or the end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let host = if host.is_empty() { "worker".to_owned() } else { host };
    format!("{host}-{}", std::process::id())
}

fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Either::deserialize(d)? {
        Either::One(s) => jobsched_client::parse_coordinators(&s),
        Either::Many(v) => v.into_iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
    })
}

/// Command-line flags of `jobsched-worker`. Each overrides the config file
/// and the environment variable named in its help.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(name = "jobsched-worker", version, about = "Stateless job scheduler worker")]
pub struct WorkerArgs {
    /// TOML configuration file.
    #[arg(long, env = "JOBSCHED_CONFIG")]
    pub config: Option<PathBuf>,
    /// Coordinator base URLs, comma-separated [env: JOBSCHED_COORDINATORS]
    /// [default: http://127.0.0.1:5001,http://127.0.0.1:5002,http://127.0.0.1:5003].
    #[arg(long, value_delimiter = ',')]
    pub coordinators: Option<Vec<String>>,
    /// Worker name [env: JOBSCHED_NAME] [default: HOSTNAME-PID].
    #[arg(long)]
    pub name: Option<String>,
    /// Register under this id [env: JOBSCHED_WORKER_ID] [default: random].
    #[arg(long)]
    pub worker_id: Option<Uuid>,
    /// Jobs run at once [env: JOBSCHED_CAPACITY] [default: 10].
    #[arg(long)]
    pub capacity: Option<u32>,
    /// Built-in job types to run, comma-separated [env: JOBSCHED_JOB_TYPES]
    /// [default: echo,sample,shell,http,fail].
    #[arg(long, value_delimiter = ',')]
    pub job_types: Option<Vec<String>>,
    /// Seconds between heartbeats [env: JOBSCHED_HEARTBEAT_INTERVAL_SECONDS] [default: 5].
    #[arg(long)]
    pub heartbeat_interval_seconds: Option<f64>,
    /// Lease length in seconds [env: JOBSCHED_LEASE_SECONDS] [default: 60].
    #[arg(long)]
    pub lease_seconds: Option<u64>,
    /// Long-poll wait of one acquire in seconds [env: JOBSCHED_POLL_WAIT_SECONDS] [default: 20].
    #[arg(long)]
    pub poll_wait_seconds: Option<f64>,
    /// Seconds running jobs may finish on shutdown [env: JOBSCHED_DRAIN_TIMEOUT_SECONDS] [default: 30].
    #[arg(long)]
    pub drain_timeout_seconds: Option<f64>,
    /// Limit on one coordinator request in seconds [env: JOBSCHED_REQUEST_TIMEOUT_SECONDS] [default: 10].
    #[arg(long)]
    pub request_timeout_seconds: Option<f64>,
    /// Log format [env: JOBSCHED_LOG_FORMAT] [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The flags that were given, as a partial config (absent keys are left out
/// so they do not override lower layers).
#[derive(Serialize)]
struct FlagOverrides<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    coordinators: Option<&'a Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    capacity: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_types: Option<&'a Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_interval_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    poll_wait_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_timeout_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_timeout_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
}

/// Keys read from the environment, and whether each is text (kept as is)
/// rather than parsed as a number/bool.
const ENV_KEYS: &[(&str, bool)] = &[
    ("coordinators", true),
    ("name", true),
    ("worker_id", true),
    ("capacity", false),
    ("job_types", true),
    ("heartbeat_interval_seconds", false),
    ("lease_seconds", false),
    ("poll_wait_seconds", false),
    ("drain_timeout_seconds", false),
    ("request_timeout_seconds", false),
    ("log_format", true),
];

/// The `JOBSCHED_*` variables among `vars`, as a figment provider. Taking
/// the variables as a value (not reading the process environment) keeps
/// tests independent of each other.
struct EnvVars(Vec<(String, String)>);

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable")
            .interpolater(|_, keys| format!("{ENV_PREFIX}{}", keys.join(".").to_ascii_uppercase()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (k, v) in &self.0 {
            let Some(rest) = k.strip_prefix(ENV_PREFIX) else { continue };
            let key = rest.to_ascii_lowercase();
            if let Some((_, text)) = ENV_KEYS.iter().find(|(name, _)| *name == key) {
                let value = if *text {
                    Value::from(v.clone())
                } else {
                    v.parse::<Value>().unwrap_or_else(|never| match never {})
                };
                dict.insert(key, value);
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Build the configuration from defaults, the file named by `args.config`,
/// the `JOBSCHED_*` entries of `env` and the flags in `args`, then validate.
/// The binary passes `std::env::vars()`.
pub fn load(args: &WorkerArgs, env: impl IntoIterator<Item = (String, String)>) -> Result<WorkerConfig, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(WorkerConfig::default()));
    if let Some(path) = &args.config {
        if !path.is_file() {
            return Err(ConfigError(format!("config file {} does not exist", path.display())));
        }
        fig = fig.merge(Toml::file_exact(path));
    }
    let flags = FlagOverrides {
        coordinators: args.coordinators.as_ref(),
        name: args.name.as_ref(),
        worker_id: args.worker_id,
        capacity: args.capacity,
        job_types: args.job_types.as_ref(),
        heartbeat_interval_seconds: args.heartbeat_interval_seconds,
        lease_seconds: args.lease_seconds,
        poll_wait_seconds: args.poll_wait_seconds,
        drain_timeout_seconds: args.drain_timeout_seconds,
        request_timeout_seconds: args.request_timeout_seconds,
        log_format: args.log_format,
    };
    fig = fig.merge(EnvVars(env.into_iter().collect())).merge(Serialized::defaults(flags));
    let config: WorkerConfig = fig.extract().map_err(|e| ConfigError(e.to_string()))?;
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = load(&WorkerArgs::default(), Vec::new()).unwrap();
        assert_eq!(c, WorkerConfig::default());
        assert_eq!(c.capacity, 10);
        assert_eq!(c.coordinators.len(), 3);
        assert_eq!(c.job_types, BUILTIN_TYPES);
        assert_eq!(c.heartbeat_interval(), Duration::from_secs(5));
        assert_eq!(c.lease_seconds, 60);
        assert_eq!(c.drain_timeout(), Duration::from_secs(30));
    }

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        std::fs::write(
            &path,
            r#"
            coordinators = ["http://file:1", "http://file:2"]
            name = "from-file"
            capacity = 3
            poll_wait_seconds = 7.5
            job_types = "echo, shell"
            log_format = "json"
            "#,
        )
        .unwrap();
        let args = WorkerArgs::try_parse_from([
            "jobsched-worker",
            "--config",
            path.to_str().unwrap(),
            "--capacity",
            "5",
            "--job-types",
            "fail,sample",
        ])
        .unwrap();
        let vars = env(&[
            ("JOBSCHED_CAPACITY", "4"),
            ("JOBSCHED_NAME", "from-env"),
            ("JOBSCHED_LEASE_SECONDS", "90"),
            ("JOBSCHED_COORDINATORS", "http://env:1,http://env:2,http://env:3"),
            ("JOBSCHED_NODE_ID", "7"), // another component's variable: ignored
            ("PATH", "/bin"),
        ]);
        let c = load(&args, vars).unwrap();
        assert_eq!(c.capacity, 5, "flag wins over env and file");
        assert_eq!(c.name.as_deref(), Some("from-env"), "env wins over file");
        assert_eq!(c.coordinators, vec!["http://env:1", "http://env:2", "http://env:3"]);
        assert_eq!(c.lease_seconds, 90);
        assert_eq!(c.poll_wait_seconds, 7.5, "file wins over default");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.job_types, vec!["fail", "sample"]);
        assert_eq!(c.heartbeat_interval_seconds, 5.0, "default kept");

        // Without the flags, the env layer shows through.
        let args = WorkerArgs::try_parse_from(["jobsched-worker", "--config", path.to_str().unwrap()]).unwrap();
        let c = load(&args, env(&[("JOBSCHED_CAPACITY", "4")])).unwrap();
        assert_eq!(c.capacity, 4);
        assert_eq!(c.coordinators, vec!["http://file:1", "http://file:2"]);
        assert_eq!(c.job_types, vec!["echo", "shell"]);
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, "capacty = 3\n").unwrap();
        let args = WorkerArgs { config: Some(path), ..Default::default() };
        let e = load(&args, Vec::new()).unwrap_err();
        assert!(e.0.contains("capacty"), "{e}");

        let e = load(&WorkerArgs::default(), env(&[("JOBSCHED_CAPACITY", "many")])).unwrap_err();
        assert!(e.0.contains("JOBSCHED_CAPACITY") || e.0.contains("capacity"), "{e}");

        let args = WorkerArgs { capacity: Some(0), ..Default::default() };
        assert!(load(&args, Vec::new()).unwrap_err().0.contains("capacity"));

        let args = WorkerArgs { heartbeat_interval_seconds: Some(40.0), ..Default::default() };
        assert!(load(&args, Vec::new()).unwrap_err().0.contains("half of lease_seconds"));

        let args = WorkerArgs { poll_wait_seconds: Some(f64::NAN), ..Default::default() };
        assert!(load(&args, Vec::new()).is_err());

        let args = WorkerArgs { config: Some("/nonexistent/worker.toml".into()), ..Default::default() };
        assert!(load(&args, Vec::new()).unwrap_err().0.contains("does not exist"));
    }

    #[test]
    fn default_name_has_the_pid() {
        let n = default_name();
        assert!(n.ends_with(&format!("-{}", std::process::id())), "{n}");
    }
}
