//! The harness itself: Redis comes up and can be crashed and restarted; two Samba DCs run at
//! once on loopback addresses of their own, each answering over verified LDAPS; the seeded
//! accounts and the helpers behave; the test CA's certificates verify for their names only.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ldap3::{LdapConnAsync, LdapConnSettings};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use testkit::{RedisServer, SambaDc, TestCa, USER_PASSWORD};

fn ping(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n] == *b"+PONG\r\n")
}

#[test]
fn redis_starts_answers_and_survives_a_crash() {
    let mut redis = RedisServer::start().unwrap();
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    assert!(redis.pid() > 0);
    assert!(ping(port) && redis.is_running());

    redis.kill();
    assert!(!ping(port), "killed");
    assert_eq!(redis.pid(), 0);
    redis.restart().unwrap();
    assert!(ping(port), "restarted on the same port");
    assert_eq!(redis.port(), port);

    let other = RedisServer::start().unwrap();
    assert_ne!(other.port(), port);
    drop(redis);
    assert!(!ping(port), "stopped on drop");
    assert!(ping(other.port()));
}

#[test]
fn two_dcs_run_at_once_on_their_own_addresses() {
    let realm = "CORP.WRITEBACK.TEST";
    // The first start may provision the template (4-8 s, once per machine); both DCs start
    // at the same time, as parallel test processes do.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let t = Instant::now();
            (SambaDc::start(realm).unwrap(), t.elapsed())
        });
        let b = s.spawn(|| {
            let t = Instant::now();
            (SambaDc::start(realm).unwrap(), t.elapsed())
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    let ((a, ta), (b, tb)) = (a, b);
    println!("started {} in {ta:?} and {} in {tb:?}", a.ip(), b.ip());
    assert_ne!(a.ip(), b.ip());
    assert_ne!(a.dir(), b.dir());

    for dc in [&a, &b] {
        // rootDSE over LDAPS verified with the DC's CA and the IP SAN of its address
        assert_eq!(dc.naming_context().unwrap(), "DC=corp,DC=writeback,DC=test");
        assert_eq!(dc.base_dn(), "DC=corp,DC=writeback,DC=test");
        assert_eq!(dc.ldaps_url(), format!("ldaps://{}", dc.ip()));
        assert!(dc.krb5_conf().exists() && dc.smb_conf().exists() && dc.ca_file().exists());

        let alice = format!("alice@{}", dc.dns_domain());
        assert!(dc.can_bind(&alice, USER_PASSWORD));
        assert!(!dc.can_bind(&alice, "Wrong#Password1"));
        assert!(!dc.can_bind(&alice, ""), "an empty password is no proof");
        let (rc, text) = dc.try_bind(&alice, "Wrong#Password1").unwrap();
        assert_eq!(rc, 49, "{text}");
        assert!(dc.can_bind(&dc.svc_upn(), &dc.svc_password()));
        assert!(dc.can_bind(&dc.svc_dn(), &dc.svc_password()));
        assert!(dc.can_bind(&dc.admin_dn(), &dc.admin_password()));
        assert!(dc.kinit(&format!("alice@{}", dc.realm()), USER_PASSWORD));
        assert!(!dc.kinit(&format!("alice@{}", dc.realm()), "Wrong#Password1"));
    }

    // each DC is its own database
    let dn = a.create_user("only-on-a", "Initial#Pass1").unwrap();
    assert!(a.can_bind(&dn, "Initial#Pass1"));
    assert!(!b.can_bind(&dn, "Initial#Pass1"));
    assert_eq!(
        a.attribute(&dn, "sAMAccountName").unwrap().as_deref(),
        Some("only-on-a")
    );
    assert_eq!(
        a.attribute(&dn, "pwdlastset").unwrap().map(|v| v != "0"),
        Some(true),
        "attribute names are matched case-insensitively"
    );
    let guid = a.user_guid("only-on-a").unwrap();
    assert_eq!(guid.len(), 36, "{guid}");
    assert!(b.user_guid("only-on-a").is_err());

    // the domain policy seeded by scripts/ad-dc.sh (minimum age 0 for tests)
    let base = a.base_dn();
    assert_eq!(
        a.attribute(&base, "minPwdAge").unwrap().as_deref(),
        Some("0")
    );
    assert_eq!(
        a.attribute(&base, "minPwdLength").unwrap().as_deref(),
        Some("7")
    );

    // lockout helper
    a.create_user("locked", "Initial#Pass1").unwrap();
    let locked = format!("locked@{}", a.dns_domain());
    a.lock_out(&locked).unwrap();
    let (rc, text) = a.try_bind(&locked, "Initial#Pass1").unwrap();
    assert_eq!(rc, 49);
    assert!(text.contains("data 775"), "locked out: {text}");

    // stop and start again (failover tests), on the same address
    let ip = a.ip();
    a.stop();
    assert!(a.naming_context().is_err(), "stopped");
    assert!(b.naming_context().is_ok(), "the other DC is untouched");
    let t = Instant::now();
    a.start_again().unwrap();
    println!("restarted {ip} in {:?}", t.elapsed());
    assert_eq!(a.ip(), ip);
    assert!(a.can_bind(&dn, "Initial#Pass1"), "data survives a restart");

    // a panicking test still stops its DC (drop during unwinding)
    let pid = a.pid().unwrap();
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _dc = a;
        panic!("intentional: the DC must be stopped while unwinding");
    }));
    assert!(unwound.is_err());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "samba {pid} stopped on drop"
    );
}

/// TLS to the DC fails with a CA that did not sign its certificate.
#[tokio::test]
async fn dc_certificate_is_verified() {
    let t = Instant::now();
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    println!("one DC started from the template in {:?}", t.elapsed());
    let connect = |ca: std::path::PathBuf| {
        let url = dc.ldaps_url();
        async move {
            let tls = relay::tls::client_config_with_ca(&ca).unwrap();
            let settings = LdapConnSettings::new()
                .set_config(tls)
                .set_conn_timeout(Duration::from_secs(5));
            LdapConnAsync::with_settings(settings, &url)
                .await
                .map(|_| ())
        }
    };
    connect(dc.ca_file()).await.unwrap();
    let other = TestCa::new(&["127.0.0.1"]).unwrap();
    assert!(connect(other.ca_file()).await.is_err());
}

/// In-memory TLS handshake between a client trusting `ca` and a server with `cert`/`key`.
fn handshake(ca: &TestCa, name: &str) -> Result<(), rustls::Error> {
    relay::tls::install_crypto_provider();
    let certs = CertificateDer::pem_file_iter(ca.cert_file())
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(ca.key_file()).unwrap();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let client = relay::tls::client_config_with_ca(&ca.ca_file()).unwrap();
    let mut c = rustls::ClientConnection::new(
        Arc::clone(&client),
        ServerName::try_from(name.to_owned()).unwrap(),
    )
    .unwrap();
    let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    for _ in 0..10 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).unwrap();
        s.read_tls(&mut buf.as_slice()).unwrap();
        s.process_new_packets()?;
        let mut buf = Vec::new();
        s.write_tls(&mut buf).unwrap();
        c.read_tls(&mut buf.as_slice()).unwrap();
        c.process_new_packets()?;
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn test_ca_issues_a_server_certificate_for_its_names() {
    let ca = TestCa::new(&["127.0.0.1", "localhost"]).unwrap();
    for f in [ca.ca_file(), ca.cert_file(), ca.key_file()] {
        assert!(f.exists(), "{}", f.display());
    }
    handshake(&ca, "127.0.0.1").unwrap();
    handshake(&ca, "localhost").unwrap();
    assert!(handshake(&ca, "elsewhere.example").is_err());
    let other = TestCa::new(&["127.0.0.1"]).unwrap();
    assert_ne!(
        std::fs::read(other.ca_file()).unwrap(),
        std::fs::read(ca.ca_file()).unwrap()
    );
}
