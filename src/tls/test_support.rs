//! What the `tls` tests share: a rustls client config and a real handshake over an
//! in-memory pipe. Built for tests only.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    ClientConfig, HandshakeKind, ProtocolVersion, RootCertStore, SupportedProtocolVersion,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub(super) const BOTH: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

pub(super) fn client_config(
    roots: &[CertificateDer<'static>],
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// What the client saw of one handshake.
pub(super) struct Served {
    pub(super) chain: Vec<CertificateDer<'static>>,
    pub(super) version: ProtocolVersion,
    pub(super) kind: HandshakeKind,
}

/// A real handshake over an in-memory pipe; the server sends a greeting so that
/// TLS 1.3 session tickets reach the client before it hangs up. An IP address as
/// `name` makes the client send no SNI.
pub(super) async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> Result<Served, String> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server);
    let server_task = tokio::spawn(async move {
        let mut tls = acceptor.accept(server_io).await?;
        tls.write_all(b"+OK\r\n").await?;
        tls.flush().await?;
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).await?;
        Ok::<_, std::io::Error>(())
    });
    let client_side = async {
        let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        let mut tls = TlsConnector::from(client)
            .connect(server_name, client_io)
            .await
            .map_err(|e| e.to_string())?;
        let mut greeting = [0u8; 5];
        tls.read_exact(&mut greeting)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(&greeting, b"+OK\r\n");
        let (_, conn) = tls.get_ref();
        let served = Served {
            chain: conn
                .peer_certificates()
                .ok_or("no peer certificates")?
                .to_vec(),
            version: conn.protocol_version().ok_or("no version")?,
            kind: conn.handshake_kind().ok_or("no handshake kind")?,
        };
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(served)
    };
    let result = tokio::time::timeout(Duration::from_secs(10), client_side)
        .await
        .map_err(|_| "handshake timed out".to_string())?;
    match &result {
        Ok(_) => tokio::time::timeout(Duration::from_secs(10), server_task)
            .await
            .expect("server side timed out")
            .expect("server task panicked")
            .expect("server side failed"),
        Err(_) => server_task.abort(),
    }
    result
}
