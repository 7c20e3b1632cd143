//! A cluster for the tests: one real redis-server and several `mailgate serve` processes
//! on 127.0.0.1, each with its own data dir and client-facing certificates, and a
//! replica-link certificate for its own name from a cluster CA separate from every
//! client-facing one. The link ports are chosen before any replica starts (every replica
//! lists every peer). Also clients the tests need around it: POP3 from another loopback
//! address (the original client address must survive the forward), and a bare TLS client
//! for the replica link with a certificate of the test's choosing.

use super::redis_server::{RedisServer, Resp};
use super::{free_port, tls_connector, Options, Raw, Server, TestCa};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};

/// `locks.ttl_secs`: short, so a killed home's maildrop locks expire quickly; replicas
/// announce their copies every third of it.
pub const TTL: Duration = Duration::from_secs(3);
/// `cluster.connect_timeout_ms`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

/// The name of replica `i`, as a StatefulSet would name its pods.
pub fn replica_name(i: usize) -> String {
    format!("mailgate-{i}")
}

#[derive(Clone)]
pub struct ClusterOptions {
    pub replicas: usize,
    /// `[cluster.pins]`: domain = replica name, the same on every replica.
    pub pins: Vec<(String, String)>,
    /// Options of every replica (always run as the binary).
    pub replica: Options,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            replicas: 3,
            pins: Vec::new(),
            replica: Options::default(),
        }
    }
}

pub struct Cluster {
    pub redis: RedisServer,
    /// Replica `i` is named [`replica_name`]`(i)`.
    pub replicas: Vec<Server>,
    /// The replica link's CA (not the client-facing one of any replica).
    pub ca: TestCa,
    /// Each replica's `cluster.listen`.
    pub links: Vec<SocketAddr>,
    /// Certificates, the shared secret.
    pub dir: tempfile::TempDir,
}

impl TestCa {
    /// A leaf for the replica link: usable as a TLS server and as a TLS client.
    pub fn issue_replica(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        self.issue_for(
            stem,
            names,
            vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }
}

impl Cluster {
    /// Redis, then every replica (in parallel), each knowing every peer.
    pub fn start(opts: ClusterOptions) -> Cluster {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().expect("cluster dir");
        let ca_dir = dir.path().join("cluster-ca");
        std::fs::create_dir(&ca_dir).expect("ca dir");
        let ca = TestCa::new(&ca_dir);
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "a cluster secret of well over thirty-two bytes\n")
            .expect("secret");
        // A link port found free can be taken before its replica binds it: try again
        // with others.
        for _ in 0..5 {
            let ports: Vec<u16> = (0..opts.replicas).map(|_| link_port()).collect();
            if let Some(replicas) = start_replicas(&opts, &redis, &ca, &secret, &ports) {
                return Cluster {
                    redis,
                    replicas,
                    ca,
                    links: ports
                        .iter()
                        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                        .collect(),
                    dir,
                };
            }
        }
        panic!("no replica link ports found free 5 times");
    }

    /// `HGETALL mailgate:home:<domain>`: home, state, epoch (empty when there is none).
    pub fn home_record(&self, domain: &str) -> BTreeMap<String, String> {
        let key = format!("mailgate:home:{domain}");
        let Resp::Array(items) = self.redis.cmd(&["HGETALL", &key]) else {
            panic!("HGETALL {key}")
        };
        let mut out = BTreeMap::new();
        for pair in items.chunks(2) {
            if let [Resp::Bulk(Some(k)), Resp::Bulk(Some(v))] = pair {
                out.insert(k.clone(), v.clone());
            }
        }
        out
    }

    /// Every replica's log, for failure messages.
    pub fn logs(&self) -> String {
        self.replicas
            .iter()
            .enumerate()
            .map(|(i, s)| format!("--- {} ---\n{}\n", replica_name(i), s.log_text()))
            .collect()
    }
}

/// Starts every replica (in parallel) with the link ports `ports`; `None` when one of
/// them found its port taken.
fn start_replicas(
    opts: &ClusterOptions,
    redis: &RedisServer,
    ca: &TestCa,
    secret: &Path,
    ports: &[u16],
) -> Option<Vec<Server>> {
    let links: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let mut peers = String::from("[cluster.peers]\n");
    for (i, addr) in links.iter().enumerate() {
        peers.push_str(&format!("\"{}\" = \"{addr}\"\n", replica_name(i)));
    }
    let mut pins = String::from("[cluster.pins]\n");
    for (domain, replica) in &opts.pins {
        pins.push_str(&format!("\"{domain}\" = \"{replica}\"\n"));
    }
    let extras: Vec<String> = (0..opts.replicas)
        .map(|i| {
            let name = replica_name(i);
            let (cert, key) = ca.issue_replica(&name, &[&name]);
            format!(
                r#"{base}
[locks]
backend = "redis"
redis_url = "{url}"
ttl_secs = {ttl}
redis_timeout_ms = 500

[cluster]
name = "{name}"
listen = "{listen}"
cert = "{cert}"
key = "{key}"
ca = "{ca}"
secret_file = "{secret}"
connect_timeout_ms = {connect}
{peers}{pins}"#,
                base = opts.replica.extra,
                url = redis.url(),
                ttl = TTL.as_secs(),
                listen = links[i],
                cert = cert.display(),
                key = key.display(),
                ca = ca.ca_pem.display(),
                secret = secret.display(),
                connect = CONNECT_TIMEOUT.as_millis(),
            )
        })
        .collect();
    let results: Vec<std::thread::Result<Server>> = std::thread::scope(|s| {
        let started: Vec<_> = extras
            .into_iter()
            .map(|extra| {
                let opts = Options {
                    process: true,
                    extra,
                    ..opts.replica.clone()
                };
                s.spawn(move || Server::start_with(opts))
            })
            .collect();
        started.into_iter().map(|t| t.join()).collect()
    });
    let mut replicas = Vec::new();
    let mut port_taken = false;
    for result in results {
        match result {
            Ok(server) => replicas.push(server),
            Err(panic) => {
                let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
                if !text.contains("(cluster): Address already in use") {
                    std::panic::resume_unwind(panic);
                }
                port_taken = true;
            }
        }
    }
    // The replicas that did start are stopped on drop.
    (!port_taken).then_some(replicas)
}

/// A port for a replica link: free now, and below the kernel's ephemeral range, so no
/// other test's `127.0.0.1:0` listener or outgoing connection takes it before the
/// replica binds it (or while a killed replica is restarted).
fn link_port() -> u16 {
    use rand::Rng;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let range = if low > 12000 { 10000..low } else { 0..0 };
    if range.is_empty() {
        return free_port();
    }
    for _ in 0..100 {
        let port = rand::thread_rng().gen_range(range.clone());
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port()
}

/// A TCP connection to `addr` from `local` (e.g. 127.0.0.2: any 127/8 address is
/// loopback on Linux).
async fn connect_from(local: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(local, 0))
        .expect("bind the client address");
    tokio::time::timeout(super::TIMEOUT, socket.connect(addr))
        .await
        .expect("connect timeout")
        .expect("connect")
}

impl Raw {
    /// A cleartext connection to `addr` from the address `local`.
    pub async fn plain_from(local: IpAddr, addr: SocketAddr) -> Raw {
        Raw {
            stream: Box::new(connect_from(local, addr).await),
            buf: Vec::new(),
        }
    }

    /// Writes without failing the test: a peer that refused the connection may have
    /// closed it already.
    pub async fn try_send(&mut self, data: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(data).await?;
        self.stream.flush().await
    }

    /// Closes the sending side (for TLS: close_notify first), as a polite client that
    /// hangs up without QUIT does.
    pub async fn shutdown(&mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.stream.shutdown().await;
    }

    /// Implicit TLS to `addr` from the address `local`.
    pub async fn tls_from(local: IpAddr, addr: SocketAddr, ca: &Path, sni: &str) -> Raw {
        let s = connect_from(local, addr).await;
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("sni");
        let tls = tokio::time::timeout(super::TIMEOUT, tls_connector(ca).connect(name, s))
            .await
            .expect("tls timeout")
            .expect("tls");
        Raw {
            stream: Box::new(tls),
            buf: Vec::new(),
        }
    }
}

/// Connects to a replica link as `server_name` expects, offering `alpn` and presenting
/// `client` (cert, key) if any. The handshake's own error is returned, but with TLS 1.3
/// a server's refusal of the client certificate arrives only at the first read.
pub async fn link_client(
    addr: SocketAddr,
    roots: &Path,
    server_name: &str,
    alpn: &[u8],
    client: Option<(&Path, &Path)>,
) -> std::io::Result<Raw> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(roots).expect("ca") {
        store.add(cert.expect("ca cert")).expect("add root");
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(store);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .expect("cert")
                .map(|c| c.expect("cert"))
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).expect("name");
    let tls = tokio::time::timeout(
        super::TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("link handshake timeout")?;
    Ok(Raw {
        stream: Box::new(tls),
        buf: Vec::new(),
    })
}
