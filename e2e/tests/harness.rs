//! The e2e helpers themselves: each must be able to fail, or the checks built on them pass
//! whatever happens. Sockets are made in this test process and looked for in /proc; a process
//! log is made unreadable; component tasks panic, fail and hang; a binary is older than a
//! source; a proxied connection is cut, blackholed and resumed.

use std::collections::BTreeSet;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::process::Command;
use std::time::{Duration, SystemTime};

use e2e::proxy::Proxy;
use e2e::{binary_sources, listening_sockets, newer_than, stop_task, Process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn mine() -> BTreeSet<String> {
    listening_sockets(std::process::id())
        .unwrap()
        .into_iter()
        .collect()
}

/// /proc spells 127.0.0.1:port as 0100007F:PPPP.
fn proc_v4(port: u16) -> String {
    format!("0100007F:{port:04X}")
}

#[test]
fn listening_sockets_sees_tcp_udp_and_unix_listeners_only() {
    let before = mine();
    let dir = tempfile::tempdir().unwrap();

    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let stream_path = dir.path().join("stream.sock");
    let unix_listener = UnixListener::bind(&stream_path).unwrap();
    let dgram_path = dir.path().join("dgram.sock");
    let unix_dgram = UnixDatagram::bind(&dgram_path).unwrap();
    let abstract_name = format!("e2e-harness-{}", std::process::id());
    let abstract_addr = {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).unwrap()
    };
    let unix_abstract = UnixListener::bind_addr(&abstract_addr).unwrap();

    // Not reachable by others: a connected UDP socket, a connected TCP client and its accepted
    // peer, unnamed socket pairs, an unbound datagram socket, a client of the unix listener.
    let udp_connected = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp_connected.connect(udp.local_addr().unwrap()).unwrap();
    let tcp_client = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
    let (tcp_accepted, _) = tcp.accept().unwrap();
    let pair = UnixStream::pair().unwrap();
    let dgram_pair = UnixDatagram::pair().unwrap();
    let unbound = UnixDatagram::unbound().unwrap();
    let unix_client = UnixStream::connect(&stream_path).unwrap();

    let after = mine();
    let new: Vec<&String> = after.difference(&before).collect();
    let expected = [
        format!(
            "/proc/net/tcp {}",
            proc_v4(tcp.local_addr().unwrap().port())
        ),
        format!(
            "/proc/net/udp {}",
            proc_v4(udp.local_addr().unwrap().port())
        ),
        format!("/proc/net/unix {} stream", stream_path.display()),
        format!("/proc/net/unix {} dgram", dgram_path.display()),
        format!("/proc/net/unix @{abstract_name} stream"),
    ];
    for e in &expected {
        assert!(after.contains(e), "{e} not seen; new: {new:?}");
    }
    assert_eq!(
        new.len(),
        expected.len(),
        "only the listeners are listed: {new:?}"
    );

    // IPv6 too, where the machine has it.
    if std::path::Path::new("/proc/net/if_inet6").exists() {
        let tcp6 = TcpListener::bind("[::1]:0").unwrap();
        let udp6 = UdpSocket::bind("[::1]:0").unwrap();
        let v6 = mine();
        for (table, port) in [
            ("/proc/net/tcp6", tcp6.local_addr().unwrap().port()),
            ("/proc/net/udp6", udp6.local_addr().unwrap().port()),
        ] {
            let suffix = format!(":{port:04X}");
            assert!(
                v6.iter()
                    .any(|s| s.starts_with(table) && s.ends_with(&suffix)),
                "{table} port {port} not seen: {v6:?}"
            );
        }
    } else {
        println!("no IPv6 on this machine: tcp6/udp6 not exercised");
    }
    drop((
        unix_listener,
        unix_dgram,
        unix_abstract,
        udp_connected,
        tcp_client,
        tcp_accepted,
        pair,
        dgram_pair,
        unbound,
        unix_client,
    ));
    assert_eq!(
        mine().difference(&before).count(),
        2,
        "closed unix sockets are gone (tcp and udp remain)"
    );
}

#[test]
fn process_output_is_captured_and_an_unreadable_log_fails_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("child.log");
    let mut p = Process::spawn(
        Command::new("sh").args(["-c", "echo to-stdout; echo to-stderr >&2"]),
        log.clone(),
    );
    let status = p.child.wait().unwrap();
    assert!(status.success());
    assert_eq!(p.log(), "to-stderr\n");
    assert_eq!(p.stdout(), "to-stdout\n");
    let all = String::from_utf8(p.output()).unwrap();
    assert!(
        all.contains("to-stderr") && all.contains("to-stdout"),
        "{all}"
    );

    std::fs::remove_file(&log).unwrap();
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.log()));
    let message = read.expect_err("reading a missing log must panic");
    let message = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("cannot read") && message.contains("child.log"),
        "{message}"
    );
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.output()));
    assert!(read.is_err(), "output() of a missing log must panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_component_reports_its_panic_error_and_hang() {
    // Generous for the tasks that end (a panic's backtrace takes a while to print).
    let within = Duration::from_secs(10);
    let ok = tokio::spawn(async { Ok::<(), String>(()) });
    stop_task("agent fine", ok, within).await.unwrap();

    let failed = tokio::spawn(async { Err::<(), String>("redis went away".into()) });
    let e = stop_task("gateway gw-1", failed, within).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "gateway gw-1 ended with an error: redis went away"
    );

    let panicked = tokio::spawn(async {
        if std::hint::black_box(true) {
            panic!("drain lost an acknowledgment");
        }
        Ok::<(), String>(())
    });
    let e = stop_task("agent a-1", panicked, within).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "agent a-1 panicked: drain lost an acknowledgment"
    );

    let hung = tokio::spawn(async {
        std::future::pending::<()>().await;
        Ok::<(), String>(())
    });
    let e = stop_task("agent a-2", hung, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "agent a-2 did not stop within 0.3 s of being told to"
    );
}

#[test]
fn a_binary_is_refused_when_older_than_a_source() {
    let root = testkit::workspace_root();
    let rel = |files: &[std::path::PathBuf]| -> BTreeSet<String> {
        files
            .iter()
            .map(|p| {
                p.strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    };
    let agent = rel(&binary_sources(&root, "onprem-agent").unwrap());
    for must in [
        "onprem-agent/src/main.rs",
        "onprem-agent/src/link.rs",
        "relay/build.rs",
        "relay/src/lib.rs",
        "proto/writeback/v1/agent.proto",
        "proto/writeback/v1/writeback.proto",
    ] {
        assert!(agent.contains(must), "onprem-agent sources lack {must}");
    }
    let foreign: Vec<&String> = agent
        .iter()
        .filter(|p| {
            p.starts_with("cloud-gateway/")
                || p.starts_with("testkit/")
                || p.starts_with("e2e/")
                || p.contains("/tests/")
        })
        .collect();
    assert!(
        foreign.is_empty(),
        "onprem-agent is not built from {foreign:?}"
    );
    let relayctl = rel(&binary_sources(&root, "relayctl").unwrap());
    assert!(relayctl.contains("cloud-gateway/src/bin/relayctl.rs"));
    assert!(relayctl.contains("cloud-gateway/src/store/scripts.rs"));
    assert!(relayctl.contains("relay/src/envelope.rs"));
    assert!(!relayctl.iter().any(|p| p.starts_with("onprem-agent/")));
    assert!(binary_sources(&root, "no-such-binary").is_err());

    // Modification times decide.
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old.rs"), dir.path().join("new.rs"));
    std::fs::write(&old, "").unwrap();
    std::fs::write(&new, "").unwrap();
    let built = SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(built - Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        newer_than(&[old.clone(), new.clone()], built).unwrap(),
        vec![new.clone()]
    );
    assert!(newer_than(std::slice::from_ref(&old), built)
        .unwrap()
        .is_empty());
    std::fs::remove_file(&old).unwrap();
    assert!(
        newer_than(&[old], built).is_err(),
        "a missing source is an error, not fresh"
    );
}

/// An echo server on 127.0.0.1:0.
async fn echo_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn read_exact_within(s: &mut tokio::net::TcpStream, n: usize, within: Duration) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(within, s.read_exact(&mut buf))
        .await
        .expect("read in time")
        .expect("read");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_forwards_blackholes_resumes_and_cuts() {
    let proxy = Proxy::start(echo_server().await).await.unwrap();
    let mut a = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    a.write_all(b"ping").await.unwrap();
    assert_eq!(
        read_exact_within(&mut a, 4, Duration::from_secs(5)).await,
        b"ping"
    );
    assert_eq!((proxy.accepted(), proxy.open_connections()), (1, 1));

    // Blackholed: nothing comes back, and the connection stays open.
    proxy.blackhole();
    a.write_all(b"held").await.unwrap();
    let mut buf = [0u8; 4];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), a.read(&mut buf))
            .await
            .is_err(),
        "bytes crossed a blackholed proxy"
    );
    assert_eq!(proxy.open_connections(), 1);
    proxy.resume();
    assert_eq!(
        read_exact_within(&mut a, 4, Duration::from_secs(5)).await,
        b"held"
    );

    // Cut: the client sees its connection end; a new one works.
    proxy.cut();
    let end = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
        .await
        .expect("a cut connection ends");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    proxy.wait_closed(Duration::from_secs(5)).await.unwrap();
    let mut b = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    b.write_all(b"again").await.unwrap();
    assert_eq!(
        read_exact_within(&mut b, 5, Duration::from_secs(5)).await,
        b"again"
    );
    proxy
        .wait_accepted(2, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(proxy
        .wait_accepted(3, Duration::from_millis(100))
        .await
        .is_err());
}
