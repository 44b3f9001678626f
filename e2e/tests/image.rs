//! The container image (`scripts/build-image.sh`, the same contents as
//! `packaging/image/Dockerfile`): built here without pulling a base image, unpacked with
//! `umoci` (which checks the OCI layout, digests included), and the gateway run from the
//! unpacked root filesystem as the image's user and entrypoint, with nothing of the host but
//! the network: it must answer `grpc.health.v1` over TLS and stop on SIGTERM. No container
//! runtime runs on these machines (no daemon, no registry), so `chroot` stands in for one.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{binary, Process};
use relay::envelope::KeyBytes;
use testkit::{RedisServer, TestCa};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn run(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&e2e::run_ok(cmd).stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_the_gateway_from_its_own_root_filesystem() {
    relay::tls::install_crypto_provider();
    let bin = binary("cloud-gateway").unwrap();
    binary("onprem-agent").unwrap();
    let profile = bin
        .parent()
        .and_then(Path::file_name)
        .and_then(|p| p.to_str())
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR").to_owned() + "/..";
    let out = dir.path().join("image");
    run(Command::new(format!("{root}/scripts/build-image.sh"))
        .args(["--profile", &profile, "--out"])
        .arg(&out));

    // umoci reads the layout as a runtime would (index, manifest, config, layer digests).
    let bundle = dir.path().join("bundle");
    let version = env!("CARGO_PKG_VERSION");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{version}", out.join("oci").display()))
        .arg(&bundle));
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let args: Vec<String> = spec["process"]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        args,
        ["/usr/local/bin/cloud-gateway", "serve"],
        "entrypoint"
    );
    let (uid, gid) = (
        spec["process"]["user"]["uid"].as_u64().unwrap(),
        spec["process"]["user"]["gid"].as_u64().unwrap(),
    );
    assert_eq!((uid, gid), (65532, 65532), "runs as the non-root user");
    let rootfs = bundle.join("rootfs");
    for absent in ["bin/sh", "usr/bin/sh", "bin/bash"] {
        assert!(!rootfs.join(absent).exists(), "the image has {absent}");
    }

    // What a Kubernetes pod would mount: TLS files and the master key, readable by the user.
    let ca = TestCa::new(&["127.0.0.1"]).unwrap();
    let secrets = rootfs.join("etc/writeback");
    std::fs::create_dir_all(&secrets).unwrap();
    let key = KeyBytes::generate().unwrap();
    let hex: String = key.expose().iter().map(|b| format!("{b:02x}")).collect();
    e2e::write_secret(&secrets, "master.key", &hex);
    std::fs::copy(ca.cert_file(), secrets.join("tls.crt")).unwrap();
    std::fs::copy(ca.key_file(), secrets.join("tls.key")).unwrap();
    std::fs::copy(ca.ca_file(), secrets.join("ca.crt")).unwrap();
    run(Command::new("chown")
        .args(["-R", &format!("{uid}:{gid}")])
        .arg(&secrets));
    let redis = RedisServer::start().unwrap();
    let port = testkit::free_port().unwrap();
    let mut cmd = Command::new("/usr/sbin/chroot");
    cmd.arg(format!("--userspec={uid}:{gid}"))
        .arg(&rootfs)
        .args(&args)
        .env_clear()
        .env("PATH", "/usr/local/bin")
        .env("WRITEBACK_LISTEN", format!("127.0.0.1:{port}"))
        .env("WRITEBACK_TLS_CERT", "/etc/writeback/tls.crt")
        .env("WRITEBACK_TLS_KEY", "/etc/writeback/tls.key")
        .env("WRITEBACK_MASTER_KEY_FILE", "/etc/writeback/master.key")
        .env("WRITEBACK_REPLICA_ID", "image-test")
        .env("WRITEBACK_CANARY_INTERVAL_SECS", "0")
        .env("REDIS_URL", redis.url());
    let mut gateway = Process::spawn(&mut cmd, dir.path().join("gateway.log"));

    // grpc.health.v1 over TLS, as the probes ask it.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(ca.ca_file()).unwrap(),
        ))
        .domain_name("127.0.0.1");
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let answer = async {
            let mut health = HealthClient::new(endpoint.connect().await.ok()?);
            let r = health
                .check(HealthCheckRequest {
                    service: "writeback.v1.Writeback".into(),
                })
                .await
                .ok()?;
            Some(r.into_inner().status)
        }
        .await;
        if let Some(s) = answer {
            break s;
        }
        assert!(
            Instant::now() < until,
            "the gateway in the image did not answer within 20 s:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, ServingStatus::Serving as i32, "{}", gateway.log());
    // The probe the manifests run, from inside the image (which has no other tool).
    let probe = Command::new("/usr/sbin/chroot")
        .arg(format!("--userspec={uid}:{gid}"))
        .arg(&rootfs)
        .args(["/usr/local/bin/cloud-gateway", "health", "--addr"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--ca", "/etc/writeback/ca.crt", "--tls-name", "127.0.0.1"])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        probe.status.success() && String::from_utf8_lossy(&probe.stdout).contains("SERVING"),
        "the health probe from the image: {probe:?}"
    );
    // It runs as the image's user, not as root.
    let pid = gateway.child.id();
    let uid_now = std::fs::metadata(format!("/proc/{pid}")).unwrap().uid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(
        (comm.trim(), uid_now),
        ("cloud-gateway", 65532),
        "chroot execs the gateway itself"
    );
    let stopped = gateway.terminate(Duration::from_secs(15));
    assert!(
        stopped.is_some_and(|s| s.success()),
        "the gateway did not stop cleanly on SIGTERM: {stopped:?}\n{}",
        gateway.log()
    );
}
