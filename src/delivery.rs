//! Local delivery of one message to one or more recipients: every recipient is checked
//! before the body is read, the body is CRLF-normalised once while it streams in, a copy
//! is stored in each recipient's domain store, and nothing is reported delivered before
//! it is flushed. Blocking (sled, `Read`): async callers use `spawn_blocking`.

use crate::message::CrlfNormalizer;
use crate::metrics::{self, Metrics};
use crate::store::{Address, Directory, DomainStore, StoreError};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

/// Why a recipient was refused before anything was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RecipientError {
    #[error("{0}: malformed address")]
    Malformed(String),
    #[error("{0}: no such user here")]
    UnknownUser(String),
    #[error("{0}: temporary failure: {1}")]
    Temporary(String, String),
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("no recipients")]
    NoRecipients,
    #[error("invalid sender address {0:?}")]
    BadSender(String),
    #[error("recipient refused: {0}")]
    Recipient(#[from] RecipientError),
    #[error("reading the message: {0}")]
    Read(#[source] std::io::Error),
    #[error("storing the message: {0}")]
    Store(#[from] StoreError),
}

impl DeliveryError {
    /// sysexits(3) code for an LDA-style caller: 67 unknown user, 65 bad input, 75 retry.
    pub fn exit_code(&self) -> u8 {
        match self {
            DeliveryError::Recipient(RecipientError::UnknownUser(_)) => 67,
            DeliveryError::Recipient(RecipientError::Malformed(_))
            | DeliveryError::NoRecipients
            | DeliveryError::BadSender(_) => 65,
            _ => 75,
        }
    }

    /// The `result` label of the deliveries metric.
    pub fn metric_result(&self) -> &'static str {
        match self {
            DeliveryError::Recipient(RecipientError::UnknownUser(_)) => {
                metrics::DELIVERY_UNKNOWN_USER
            }
            DeliveryError::Recipient(RecipientError::Malformed(_))
            | DeliveryError::NoRecipients
            | DeliveryError::BadSender(_) => metrics::DELIVERY_BAD_INPUT,
            DeliveryError::Recipient(RecipientError::Temporary(..))
            | DeliveryError::Read(_)
            | DeliveryError::Store(_) => metrics::DELIVERY_TEMP_FAILURE,
        }
    }

    /// Short machine-readable kind for the admin socket.
    pub fn kind(&self) -> &'static str {
        match self {
            DeliveryError::Recipient(RecipientError::UnknownUser(_)) => "unknown_user",
            DeliveryError::Recipient(RecipientError::Malformed(_))
            | DeliveryError::NoRecipients
            | DeliveryError::BadSender(_) => "bad_input",
            _ => "temporary",
        }
    }
}

/// Size of the reads from the message source.
const READ_CHUNK: usize = 64 * 1024;

/// Resolves every recipient to its store, refusing the whole delivery if any is unknown,
/// so a retry never duplicates mail for the others.
pub fn resolve(
    directory: &Directory,
    recipients: &[String],
) -> Result<Vec<(Address, Arc<DomainStore>)>, DeliveryError> {
    if recipients.is_empty() {
        return Err(DeliveryError::NoRecipients);
    }
    let mut out: Vec<(Address, Arc<DomainStore>)> = Vec::with_capacity(recipients.len());
    for r in recipients {
        let address = Address::parse(r).map_err(|_| RecipientError::Malformed(r.clone()))?;
        if out.iter().any(|(a, _)| *a == address) {
            continue;
        }
        let store = match directory.domain(&address.domain) {
            Ok(s) => s,
            Err(StoreError::UnknownDomain(_)) => {
                return Err(RecipientError::UnknownUser(r.clone()).into())
            }
            Err(e) => return Err(RecipientError::Temporary(r.clone(), e.to_string()).into()),
        };
        match store.account(&address.local) {
            Ok(Some(_)) => {}
            Ok(None) => return Err(RecipientError::UnknownUser(r.clone()).into()),
            Err(e) => return Err(RecipientError::Temporary(r.clone(), e.to_string()).into()),
        }
        out.push((address, store));
    }
    Ok(out)
}

/// Checks an envelope sender for a `Return-Path:` header: `<>` (empty) or an address
/// without spaces or control characters.
pub fn valid_sender(from: &str) -> bool {
    from.len() <= 256
        && !from
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'<' || b == b'>')
}

/// Stores `source` for every recipient, with `Return-Path: <from>` prepended when a
/// sender is given; returns the stored size once all copies are durable.
pub fn deliver(
    directory: &Directory,
    from: Option<&str>,
    recipients: &[String],
    mut source: impl Read,
) -> Result<u64, DeliveryError> {
    if let Some(f) = from {
        if !valid_sender(f) {
            return Err(DeliveryError::BadSender(f.to_owned()));
        }
    }
    let targets = resolve(directory, recipients)?;
    let mut pending = targets
        .iter()
        .map(|(address, store)| store.begin_message(&address.local))
        .collect::<Result<Vec<_>, _>>()?;
    let mut normalizer = CrlfNormalizer::new();
    let mut input = vec![0u8; READ_CHUNK];
    let mut output = Vec::with_capacity(READ_CHUNK + READ_CHUNK / 8);
    let mut size = 0u64;
    if let Some(f) = from {
        output.extend_from_slice(b"Return-Path: <");
        output.extend_from_slice(f.as_bytes());
        output.extend_from_slice(b">\r\n");
        size += output.len() as u64;
        for (p, (_, store)) in pending.iter_mut().zip(&targets) {
            p.write(store, &output)?;
        }
    }
    loop {
        let n = match source.read(&mut input) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DeliveryError::Read(e)),
        };
        output.clear();
        normalizer.push(&input[..n], &mut output);
        size += output.len() as u64;
        for (p, (_, store)) in pending.iter_mut().zip(&targets) {
            p.write(store, &output)?;
        }
    }
    output.clear();
    normalizer.finish(&mut output);
    size += output.len() as u64;
    for (mut p, (_, store)) in pending.into_iter().zip(&targets) {
        p.write(store, &output)?;
        p.commit(store)?;
    }
    Ok(size)
}

/// `deliver`, counted under `protocol` in the delivery metrics: result, latency until
/// durable (or refused) and stored bytes. Protocol front ends (local, LMTP, SMTP) call
/// this rather than `deliver`.
pub fn deliver_counted(
    metrics: &Metrics,
    protocol: &str,
    directory: &Directory,
    from: Option<&str>,
    recipients: &[String],
    source: impl Read,
) -> Result<u64, DeliveryError> {
    let started = Instant::now();
    let result = deliver(directory, from, recipients, source);
    let (label, stored) = match &result {
        Ok(size) => (metrics::DELIVERY_ACCEPTED, Some(*size)),
        Err(e) => (e.metric_result(), None),
    };
    metrics.observe_delivery(protocol, label, started.elapsed(), stored);
    result
}
