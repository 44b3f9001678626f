//! The harness itself: Redis comes up and can be crashed and restarted; two Samba DCs run at
//! once on loopback addresses of their own, each answering over verified LDAPS; the seeded
//! accounts and the helpers behave; the test CA's certificates verify for their names only.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ldap3::{LdapConnAsync, LdapConnSettings};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use testkit::{Bind, RedisServer, SambaDc, TestCa, USER_PASSWORD};

fn ping(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n] == *b"+PONG\r\n")
}

/// Sends one inline command and returns the first line of the reply.
fn command(port: u16, cmd: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .last()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn redis_starts_answers_and_survives_a_crash() {
    let mut redis = RedisServer::start().unwrap();
    let port = redis.port();
    let url_port: u16 = redis.url().rsplit(':').next().unwrap().parse().unwrap();
    assert!(ping(url_port), "the url names the running server");
    assert!(ping(port) && redis.is_running());
    assert_eq!(command(port, "SET k v"), "+OK");

    let pid = redis.pid();
    redis.kill();
    assert!(!ping(port), "killed");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "reaped"
    );
    redis.restart().unwrap();
    assert!(ping(port), "restarted on the same port");
    assert_eq!(
        command(port, "GET k"),
        "$-1",
        "not durable: restarted empty"
    );

    let other = RedisServer::start().unwrap();
    assert_ne!(other.port(), port);
    drop(redis);
    assert!(!ping(port), "stopped on drop");
    assert!(ping(other.port()));
}

#[test]
fn durable_redis_keeps_what_it_acknowledged_across_a_kill() {
    let mut redis = RedisServer::start_durable().unwrap();
    let port = redis.port();
    assert_eq!(command(port, "SET kept yes"), "+OK");
    redis.kill();
    assert!(!ping(port));
    redis.restart().unwrap();
    assert_eq!(command(port, "GET kept"), "yes");
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
        assert_eq!(dc.naming_context().unwrap(), dc.base_dn());
        assert!(dc.krb5_conf().exists() && dc.smb_conf().exists() && dc.ca_file().exists());

        let alice = format!("alice@{}", dc.dns_domain());
        assert!(dc.can_bind(&alice, USER_PASSWORD));
        assert!(!dc.can_bind(&alice, "Wrong#Password1"));
        assert!(
            dc.bind(&alice, "").is_err(),
            "an empty password is no proof"
        );
        let (rc, text) = dc.try_bind(&alice, "Wrong#Password1").unwrap();
        assert_eq!(rc, 49, "{text}");
        match dc.bind(&alice, "Wrong#Password1").unwrap() {
            Bind::Rejected(text) => assert!(text.contains("data 52e"), "{text}"),
            Bind::Accepted => panic!("a wrong password bound"),
        }
        assert!(dc.can_bind(&dc.svc_upn(), &dc.svc_password()));
        assert!(dc.can_bind(&dc.svc_dn(), &dc.svc_password()));
        assert!(dc.can_bind(&dc.admin_dn(), &dc.admin_password()));
        assert!(dc.kinit(&format!("alice@{}", dc.realm()), USER_PASSWORD));
        assert!(!dc.kinit(&format!("alice@{}", dc.realm()), "Wrong#Password1"));
    }

    // AD's own count of password writes (replPropertyMetaData), the ground truth of fault tests
    let dn = a.create_user("only-on-a", "Initial#Pass1").unwrap();
    assert_eq!(a.dn_of("only-on-a").unwrap(), dn);
    let created = a.password_writes(&dn).unwrap();
    assert!(
        created >= 1,
        "a user created with a password has had it written"
    );
    assert!(a.can_bind(&dn, "Initial#Pass1"));
    assert_eq!(
        a.password_writes(&dn).unwrap(),
        created,
        "a bind writes nothing"
    );
    a.samba_tool(&[
        "user",
        "setpassword",
        "only-on-a",
        "--newpassword=Second#Pass2",
    ])
    .unwrap();
    assert_eq!(
        a.password_writes(&dn).unwrap(),
        created + 1,
        "one reset, one write"
    );
    assert!(a.can_bind(&dn, "Second#Pass2"));
    let lockouts = a.write_count(&dn, "lockoutTime").unwrap();
    assert!(a.write_count(&dn, "pwdLastSet").unwrap() >= 2);
    assert!(
        a.write_count(&dn, "objectClass").is_err(),
        "unknown attribute ids are refused"
    );
    a.samba_tool(&[
        "user",
        "setpassword",
        "only-on-a",
        "--newpassword=Initial#Pass1",
    ])
    .unwrap();
    assert_eq!(a.write_count(&dn, "lockoutTime").unwrap(), lockouts);

    // each DC is its own database
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
    // A DC that is down is no answer about credentials: negative checks cannot pass by it.
    assert!(a.bind(&dn, "Initial#Pass1").is_err());
    let asked = std::panic::catch_unwind(|| a.can_bind(&dn, "Wrong#Password1"));
    assert!(
        asked.is_err(),
        "can_bind must fail loudly when the DC is down"
    );
    assert!(a
        .try_kinit(&format!("alice@{}", a.realm()), "Wrong#Password1")
        .is_err());
    let t = Instant::now();
    a.start_again().unwrap();
    println!("restarted {ip} in {:?}", t.elapsed());
    let addr: std::net::SocketAddr = format!("{ip}:636").parse().unwrap();
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .expect("answers on the same address");
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
