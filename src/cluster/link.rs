//! The replica-to-replica link: mutual TLS with the private cluster CA, the protocol
//! chosen by ALPN. A replica dials a peer by its name and checks the peer's certificate
//! for that name; it accepts only clients whose certificate the CA signed for one of the
//! configured replica names. TLS 1.3 tickets let a forwarded session resume instead of
//! paying a full handshake. Certificates are re-read when their files change (cert-manager
//! rotates them). Speaks no mail protocol.

use crate::config::ClusterConfig;
use crate::tls::{read_chain, read_key, TlsError};
use rustls::client::{ClientSessionMemoryCache, Resumption};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpStream;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

/// What a connection on the link carries, chosen by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    Pop3,
    Lmtp,
    Smtp,
    Admin,
}

impl Alpn {
    pub const ALL: [Alpn; 4] = [Alpn::Pop3, Alpn::Lmtp, Alpn::Smtp, Alpn::Admin];

    pub fn id(self) -> &'static [u8] {
        match self {
            Alpn::Pop3 => b"mailgate-pop3/1",
            Alpn::Lmtp => b"mailgate-lmtp/1",
            Alpn::Smtp => b"mailgate-smtp/1",
            Alpn::Admin => b"mailgate-admin/1",
        }
    }

    pub fn from_id(id: &[u8]) -> Option<Alpn> {
        Alpn::ALL.into_iter().find(|a| a.id() == id)
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cluster TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cluster CA {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("cluster TLS configuration: {0}")]
    Config(String),
    #[error("{0:?} is not in cluster.peers")]
    UnknownPeer(String),
    #[error("connecting to {peer} ({addr}): {source}")]
    Connect {
        peer: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to {peer} ({addr}): no answer within {timeout:?}")]
    Timeout {
        peer: String,
        addr: String,
        timeout: Duration,
    },
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("the peer chose no known protocol")]
    Alpn,
    #[error("the client certificate names no replica in cluster.peers")]
    NotAPeer,
}

/// The TLS configurations built from one reading of the certificate files.
struct Configs {
    /// One per `Alpn` (a client offers exactly the protocol it wants), sharing one
    /// session cache.
    clients: [Arc<ClientConfig>; 4],
    acceptor: TlsAcceptor,
    /// Modification times of cert, key and CA when read.
    stamp: [Option<SystemTime>; 3],
}

/// Both ends of the link for this replica.
pub struct Link {
    name: String,
    peers: BTreeMap<String, String>,
    files: [PathBuf; 3],
    connect_timeout: Duration,
    configs: RwLock<Arc<Configs>>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load_configs(files: &[PathBuf; 3]) -> Result<Configs, LinkError> {
    let [cert, key, ca] = files;
    let stamp = [modified(cert), modified(key), modified(ca)];
    let chain = read_chain(cert)?;
    let key_der = read_key(key)?;
    let mut roots = RootCertStore::empty();
    for c in read_chain(ca)? {
        roots.add(c).map_err(|e| LinkError::Ca {
            path: ca.clone(),
            message: e.to_string(),
        })?;
    }
    let roots = Arc::new(roots);
    // Both ends are ours: TLS 1.3 only, and the suite with the cheaper key schedule
    // (SHA-256) and cipher, since every forwarded session pays for a (resumed)
    // handshake and every relayed byte for the cipher.
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256],
        ..rustls::crypto::ring::default_provider()
    });
    let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| LinkError::Config(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| LinkError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key_der.clone_key())
        .map_err(|e| LinkError::Config(e.to_string()))?;
    server.alpn_protocols = Alpn::ALL.iter().map(|a| a.id().to_vec()).collect();
    server.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| LinkError::Config(e.to_string()))?;
    // A client resumes with one ticket per connection and gets a fresh one with it.
    server.send_tls13_tickets = 1;
    let cache = Arc::new(ClientSessionMemoryCache::new(256));
    let client = |alpn: Alpn| -> Result<Arc<ClientConfig>, LinkError> {
        let mut c = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| LinkError::Config(e.to_string()))?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key_der.clone_key())
            .map_err(|e| LinkError::Config(e.to_string()))?;
        c.alpn_protocols = vec![alpn.id().to_vec()];
        c.resumption = Resumption::store(cache.clone());
        Ok(Arc::new(c))
    };
    Ok(Configs {
        clients: [
            client(Alpn::Pop3)?,
            client(Alpn::Lmtp)?,
            client(Alpn::Smtp)?,
            client(Alpn::Admin)?,
        ],
        acceptor: TlsAcceptor::from(Arc::new(server)),
        stamp,
    })
}

/// The DNS names of a certificate's subjectAltName.
fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

impl Link {
    /// Reads the certificates; fails with the file that is wrong.
    pub fn load(config: &ClusterConfig) -> Result<Link, LinkError> {
        let files = [
            PathBuf::from(&config.cert),
            PathBuf::from(&config.key),
            PathBuf::from(&config.ca),
        ];
        let configs = load_configs(&files)?;
        Ok(Link {
            name: config.name.clone(),
            peers: config.peers.clone(),
            files,
            connect_timeout: config.connect_timeout(),
            configs: RwLock::new(Arc::new(configs)),
        })
    }

    fn configs(&self) -> Arc<Configs> {
        self.configs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the certificates when a file changed; `Ok(true)` when it did. A failed
    /// reading keeps the previous certificates.
    pub fn reload_if_changed(&self) -> Result<bool, LinkError> {
        let [cert, key, ca] = &self.files;
        let now = [modified(cert), modified(key), modified(ca)];
        if now == self.configs().stamp {
            return Ok(false);
        }
        let fresh = load_configs(&self.files)?;
        *self.configs.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(true)
    }

    /// This replica's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every replica name, this one included, in order.
    pub fn peer_names(&self) -> impl Iterator<Item = &str> {
        self.peers.keys().map(String::as_str)
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Dials `peer` for `alpn` and completes the handshake within the connect timeout,
    /// trying once more after a brief pause when the first attempt fails fast (a
    /// restarting pod refuses connections for a moment). Returns the stream and the time
    /// it took.
    pub async fn connect(
        &self,
        peer: &str,
        alpn: Alpn,
    ) -> Result<(client::TlsStream<TcpStream>, Duration), LinkError> {
        let addr = self
            .peers
            .get(peer)
            .ok_or_else(|| LinkError::UnknownPeer(peer.to_owned()))?;
        let started = Instant::now();
        let deadline = started + self.connect_timeout;
        let mut tried_again = false;
        loop {
            let attempt = tokio::time::timeout_at(deadline.into(), self.dial(peer, addr, alpn));
            match attempt.await {
                Ok(Ok(stream)) => return Ok((stream, started.elapsed())),
                Ok(Err(e)) => {
                    let pause = Duration::from_millis(100);
                    if tried_again || Instant::now() + pause * 2 >= deadline {
                        return Err(e);
                    }
                    tried_again = true;
                    tokio::time::sleep(pause).await;
                }
                Err(_) => {
                    return Err(LinkError::Timeout {
                        peer: peer.to_owned(),
                        addr: addr.clone(),
                        timeout: self.connect_timeout,
                    })
                }
            }
        }
    }

    async fn dial(
        &self,
        peer: &str,
        addr: &str,
        alpn: Alpn,
    ) -> Result<client::TlsStream<TcpStream>, LinkError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| LinkError::Connect {
                peer: peer.to_owned(),
                addr: addr.to_owned(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(peer.to_owned())
            .map_err(|_| LinkError::UnknownPeer(peer.to_owned()))?;
        let connector = TlsConnector::from(self.configs().clients[alpn.index()].clone());
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(LinkError::Handshake)?;
        let conn = tls.get_ref().1;
        if conn.alpn_protocol() != Some(alpn.id()) {
            return Err(LinkError::Alpn);
        }
        tracing::debug!(peer, kind = ?conn.handshake_kind(), "replica link connected");
        Ok(tls)
    }

    /// The server side: the handshake (client certificate required), the protocol the
    /// client chose, and the replica name its certificate carries.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> Result<(server::TlsStream<TcpStream>, Alpn, String), LinkError> {
        let acceptor = self.configs().acceptor.clone();
        let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(LinkError::Handshake(e)),
            Err(_) => {
                return Err(LinkError::Handshake(std::io::ErrorKind::TimedOut.into()));
            }
        };
        let conn = tls.get_ref().1;
        let alpn = conn
            .alpn_protocol()
            .and_then(Alpn::from_id)
            .ok_or(LinkError::Alpn)?;
        let names = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(dns_names)
            .unwrap_or_default();
        let peer = names
            .into_iter()
            .find(|n| self.peers.contains_key(n))
            .ok_or(LinkError::NotAPeer)?;
        Ok((tls, alpn, peer))
    }
}
