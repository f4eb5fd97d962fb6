//! Nagle's algorithm is off on every TCP connection a node holds: its clients'
//! (HTTP and WebSocket), its links to Redis (commands, and the subscriber's own; on
//! one Redis and on Redis Cluster) and its webhook client's.
//! With it on, a frame written while the peer has not yet acknowledged the previous
//! one waits for that ACK: a round trip, or the peer's delayed ACK (40 ms on Linux,
//! up to 200 ms on Windows). Linux on loopback acknowledges as soon as the reader
//! reads, so no timing shows it here: the test reads the option off the node's own
//! sockets (`pidfd_getfd`, which needs the right to ptrace the node: root, or the
//! same user with Yama's ptrace_scope at most 1).
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;

use rustix::net::{getpeername, getsockname, sockopt};
use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
use sessionhub_tests::process::wait_ready;
use sessionhub_tests::webhook::{EVENT_WAIT, Receiver, webhook_env};
use sessionhub_tests::{Api, Deployment, Store, Topology, WsClient, wait_for};

/// Every connected TCP socket of process `pid`: (local, peer, TCP_NODELAY).
fn tcp_sockets(pid: u32) -> Vec<(SocketAddr, SocketAddr, bool)> {
    let raw = i32::try_from(pid).unwrap();
    let pidfd = pidfd_open(Pid::from_raw(raw).unwrap(), PidfdFlags::empty())
        .unwrap_or_else(|e| panic!("pidfd_open({pid}): {e}"));
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        // A descriptor closed since the listing has no link any more.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let n: i32 = entry.file_name().to_str().unwrap().parse().unwrap();
        let fd = match pidfd_getfd(&pidfd, n, PidfdGetfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::BADF) => continue,
            Err(e) => panic!(
                "pidfd_getfd on the node's descriptor {n}: {e} (the test needs the right \
                 to ptrace the node: run it as root, or as the same user with \
                 /proc/sys/kernel/yama/ptrace_scope at most 1)"
            ),
        };
        let (Ok(local), Ok(Some(peer))) = (getsockname(&fd), getpeername(&fd)) else {
            continue; // a listener, or not connected
        };
        let (Ok(local), Ok(peer)) = (SocketAddr::try_from(local), SocketAddr::try_from(peer))
        else {
            continue; // a Unix socket
        };
        out.push((local, peer, sockopt::tcp_nodelay(&fd).unwrap()));
    }
    out
}

sessionhub_tests::on_both_topologies!(every_tcp_connection_of_a_node_has_nagle_off);

async fn every_tcp_connection_of_a_node_has_nagle_off(topology: Topology) {
    // A webhook receiver, so that the node also holds its webhook client's connection
    // (kept alive between POSTs).
    let receiver = Receiver::start().await;
    let env = webhook_env(&receiver);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let d = Deployment::start_with(topology, 1, &env).await;
    let node = &d.nodes[0];
    wait_ready(node).await;
    let api = Api::new(node);
    let s = api.create_session("alice", "laptop").await;
    let _ws = WsClient::connect(node, &s.token).await.unwrap();
    wait_for("the login's webhook POST", EVENT_WAIT, || async {
        (!receiver.accepted_of("alice").is_empty()).then_some(())
    })
    .await;
    let node_port: u16 = node.base.rsplit(':').next().unwrap().parse().unwrap();
    let hook_port: u16 = receiver
        .url
        .trim_end_matches("/hook")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (store_ports, links) = match &d.store {
        // The command link and the subscriber's own link.
        Store::Single(r) => (vec![r.port()], 2),
        // A command link and a subscriber link to each master, at least.
        Store::Cluster(c) => (c.ports(), 2 * c.masters().await.len()),
    };

    let sockets = tcp_sockets(node.pid().unwrap());
    let clients = sockets
        .iter()
        .filter(|(local, ..)| local.port() == node_port)
        .count();
    let to_redis = sockets
        .iter()
        .filter(|(_, peer, _)| store_ports.contains(&peer.port()))
        .count();
    let to_hook = sockets
        .iter()
        .filter(|(_, peer, _)| peer.port() == hook_port)
        .count();
    // At least the WebSocket (held open above); the HTTP connection too unless its
    // keep-alive ran out meanwhile.
    assert!(clients >= 1, "no client connection among {sockets:?}");
    assert!(to_hook >= 1, "no webhook connection among {sockets:?}");
    assert!(
        to_redis >= links,
        "fewer than {links} links to Redis among {sockets:?}"
    );
    let nagle_on: Vec<_> = sockets.iter().filter(|(.., nodelay)| !nodelay).collect();
    assert!(
        nagle_on.is_empty(),
        "TCP connections with Nagle's algorithm on (local, peer): {nagle_on:?}"
    );
}
