//! `outbound_bind`: a node's connections to its peers (Raft RPCs, relays)
//! leave from the configured local IP. Chaos partitions (scripts/cluster.sh
//! `partition N`) rely on it: their firewall rules cut node N off by its IP
//! while clients, whose connections come from 127.0.0.1, still reach it.
//!
//! A real coordinator is started with a second member that is only a plain
//! TCP listener on another loopback IP; the node's vote requests connect to
//! it, and the listener sees where they come from.

mod common;

use std::io::ErrorKind;
use std::net::{IpAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts node 1 on `node_ip` with a fake peer 2 on `peer_ip` and returns the
/// source IP of the first connection the node opens to the peer.
fn first_peer_connection_source(node_ip: &str, peer_ip: &str, outbound_bind: Option<&str>) -> IpAddr {
    let dir = tempfile::tempdir().expect("tempdir");
    let node_port = TcpListener::bind((node_ip, 0)).expect("bind node ip").local_addr().expect("addr").port();
    let peer = TcpListener::bind((peer_ip, 0)).expect("bind peer ip");
    let peer_port = peer.local_addr().expect("addr").port();
    let mut cfg = format!(
        "node_id = 1\nlisten = \"{node_ip}:{node_port}\"\ndata_dir = \"{}\"\n\
         peers = [{{ id = 1, addr = \"{node_ip}:{node_port}\" }}, {{ id = 2, addr = \"{peer_ip}:{peer_port}\" }}]\n",
        dir.path().join("data").display()
    );
    if let Some(ip) = outbound_bind {
        cfg.push_str(&format!("outbound_bind = \"{ip}\"\n"));
    }
    let config = dir.path().join("node.toml");
    std::fs::write(&config, cfg).expect("write config");
    let log = std::fs::File::create(dir.path().join("node.log")).expect("log");
    let mut child = Command::new(common::bin("jobsched-coordinator"))
        .arg("--config")
        .arg(&config)
        .env_remove("JOBSCHED_CONFIG")
        .env_remove("JOBSCHED_OUTBOUND_BIND")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("spawn coordinator");

    // Why 20 s: the node campaigns after its first election timeout (under a
    // second); the rest is slack for a loaded machine starting RocksDB.
    peer.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + Duration::from_secs(20);
    let source = loop {
        match peer.accept() {
            Ok((_, from)) => break Some(from.ip()),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    source.unwrap_or_else(|| {
        let log = std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default();
        panic!("the node never connected to its peer; log:\n{log}")
    })
}

#[test]
fn peer_connections_leave_from_the_outbound_bind_ip() {
    // Control: without the setting the kernel picks 127.0.0.1 for any
    // loopback destination, which is why the setting is needed at all.
    let src = first_peer_connection_source("127.0.0.41", "127.0.0.42", None);
    assert_eq!(src, "127.0.0.1".parse::<IpAddr>().unwrap());

    let src = first_peer_connection_source("127.0.0.43", "127.0.0.44", Some("127.0.0.43"));
    assert_eq!(src, "127.0.0.43".parse::<IpAddr>().unwrap());
}
