//! Local delivery of one message to one or more recipients: recipients and quotas are
//! checked, the body is CRLF-normalised once while it streams in, a copy is stored in
//! each recipient's domain store, and nothing is reported delivered before it is
//! flushed. Blocking (sled, `Read`): async callers use `spawn_blocking`. Speaks no
//! protocol: LMTP/SMTP map the verdicts to replies.

use crate::config::DeliveryConfig;
use crate::message::CrlfNormalizer;
use crate::metrics::{self, Metrics};
use crate::smtp::core::Verdict;
use crate::store::{Account, Address, Directory, DomainStore, PendingMessage, StoreError};
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

/// Quota settings, 0 meaning unlimited.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quotas {
    /// Default maildrop size; an account's own `quota_bytes` overrides it.
    pub account: u64,
    /// All maildrops of one domain together.
    pub domain: u64,
}

impl Quotas {
    pub fn from_config(c: &DeliveryConfig) -> Quotas {
        Quotas {
            account: c.account_quota_bytes,
            domain: c.domain_quota_bytes,
        }
    }
}

/// Whether `size` more octets fit `used` under `limit` (0 = unlimited).
fn fits(limit: u64, used: u64, size: u64) -> Verdict {
    if limit == 0 || used.saturating_add(size) <= limit {
        Verdict::Accepted
    } else if size > limit {
        Verdict::QuotaTooSmall
    } else {
        Verdict::QuotaFull
    }
}

/// Checks the account's and the domain's quota for a message of `size` octets.
///
/// Soft under concurrency: two deliveries racing for the last room may both fit.
pub fn quota_verdict(
    store: &DomainStore,
    local: &str,
    account: &Account,
    size: u64,
    quotas: Quotas,
) -> Result<Verdict, StoreError> {
    let limit = account.quota_bytes.unwrap_or(quotas.account);
    if limit != 0 {
        let (_, used) = store.maildrop_usage(local)?;
        let v = fits(limit, used, size);
        if v != Verdict::Accepted {
            return Ok(v);
        }
    }
    if quotas.domain != 0 {
        let (_, _, used) = store.usage()?;
        return Ok(fits(quotas.domain, used, size));
    }
    Ok(Verdict::Accepted)
}

/// The RCPT-time decision for one recipient: hosted domain, existing account, room for
/// `size` octets (the client's SIZE= estimate, or 0).
pub fn check_recipient(directory: &Directory, rcpt: &str, size: u64, quotas: Quotas) -> Verdict {
    let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d);
    if !directory.has_domain(domain) {
        return Verdict::RelayDenied;
    }
    // A hosted domain, but a name no account can have (quoted, UTF-8, too long).
    let Ok(address) = Address::parse(rcpt) else {
        return Verdict::UnknownUser;
    };
    let result = directory.domain(&address.domain).and_then(|store| {
        let Some(account) = store.account(&address.local)? else {
            return Ok(Verdict::UnknownUser);
        };
        quota_verdict(&store, &address.local, &account, size, quotas)
    });
    result.unwrap_or_else(|e| {
        tracing::warn!(recipient = rcpt, error = %e, "recipient check failed");
        match e {
            StoreError::UnknownDomain(_) => Verdict::RelayDenied,
            _ => Verdict::TempFail,
        }
    })
}

/// One stored copy in the making.
struct Target {
    address: Address,
    store: Arc<DomainStore>,
    /// `None` once this copy is committed or failed.
    pending: Option<PendingMessage>,
    /// The outcome, once there is one.
    verdict: Option<Verdict>,
}

/// A message being written to several recipients' stores at once; each copy succeeds or
/// fails on its own, which is what LMTP reports per recipient.
pub struct Batch {
    targets: Vec<Target>,
    /// For each recipient as given, the index of its target (duplicates share one).
    slots: Vec<Result<usize, Verdict>>,
    octets: u64,
}

impl Batch {
    /// Opens a pending message for every recipient (checked again: an account may be gone
    /// since RCPT). Recipients given twice get one copy.
    pub fn begin(directory: &Directory, recipients: &[String]) -> Batch {
        let mut targets: Vec<Target> = Vec::with_capacity(recipients.len());
        let mut slots = Vec::with_capacity(recipients.len());
        for r in recipients {
            let Ok(address) = Address::parse(r) else {
                slots.push(Err(Verdict::UnknownUser));
                continue;
            };
            if let Some(i) = targets.iter().position(|t| t.address == address) {
                slots.push(Ok(i));
                continue;
            }
            let store = match directory.domain(&address.domain) {
                Ok(s) => s,
                Err(StoreError::UnknownDomain(_)) => {
                    slots.push(Err(Verdict::RelayDenied));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(recipient = %r, error = %e, "opening the store failed");
                    slots.push(Err(Verdict::TempFail));
                    continue;
                }
            };
            let (pending, verdict) = match store.begin_message(&address.local) {
                Ok(p) => (Some(p), None),
                Err(e) => {
                    tracing::warn!(recipient = %r, error = %e, "starting the message failed");
                    (None, Some(Verdict::TempFail))
                }
            };
            slots.push(Ok(targets.len()));
            targets.push(Target {
                address,
                store,
                pending,
                verdict,
            });
        }
        Batch {
            targets,
            slots,
            octets: 0,
        }
    }

    /// Octets written so far (the stored size if the message ends now).
    pub fn octets(&self) -> u64 {
        self.octets
    }

    /// True while at least one copy can still succeed.
    pub fn any_live(&self) -> bool {
        self.targets.iter().any(|t| t.pending.is_some())
    }

    /// Appends normalised message bytes to every live copy; a copy whose store fails is
    /// dropped (and will be reported as a temporary failure), the others go on.
    pub fn write(&mut self, data: &[u8]) {
        self.octets += data.len() as u64;
        for t in &mut self.targets {
            let Some(p) = &mut t.pending else { continue };
            if let Err(e) = p.write(&t.store, data) {
                tracing::warn!(recipient = %t.address, error = %e, "storing the message failed");
                t.pending = None;
                t.verdict = Some(Verdict::TempFail);
            }
        }
    }

    /// Checks quotas against the final size and commits each copy (each commit is
    /// flushed before it counts); returns one verdict per recipient as given to `begin`.
    ///
    /// With `all_or_nothing` (SMTP, which has one reply for all recipients) nothing is
    /// committed unless every copy passed its checks, so a refusal never leaves some
    /// recipients with the message and the sender retrying for all.
    pub fn finish(mut self, quotas: Quotas, all_or_nothing: bool) -> Vec<Verdict> {
        let size = self.octets;
        let mut ready = Vec::with_capacity(self.targets.len());
        for (i, t) in self.targets.iter_mut().enumerate() {
            let Some(p) = t.pending.take() else { continue };
            let verdict = match t.store.account(&t.address.local) {
                Ok(None) => Verdict::UnknownUser,
                Ok(Some(account)) => {
                    match quota_verdict(&t.store, &t.address.local, &account, size, quotas) {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::warn!(recipient = %t.address, error = %e, "quota check failed");
                            Verdict::TempFail
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(recipient = %t.address, error = %e, "account lookup failed");
                    Verdict::TempFail
                }
            };
            if verdict != Verdict::Accepted {
                t.verdict = Some(verdict);
                continue;
            }
            ready.push((i, p));
        }
        let refused = self
            .slots
            .iter()
            .find_map(|slot| match slot {
                Err(v) => Some(*v),
                Ok(_) => None,
            })
            .or_else(|| self.targets.iter().find_map(|t| t.verdict));
        if let (true, Some(v)) = (all_or_nothing, refused) {
            for (i, _) in ready {
                self.targets[i].verdict = Some(v);
            }
            return self.verdicts();
        }
        for (i, p) in ready {
            let t = &mut self.targets[i];
            t.verdict = Some(match p.commit(&t.store) {
                Ok(_) => Verdict::Accepted,
                Err(StoreError::UnknownAccount(_)) => Verdict::UnknownUser,
                Err(e) => {
                    tracing::warn!(recipient = %t.address, error = %e, "committing the message failed");
                    Verdict::TempFail
                }
            });
        }
        self.verdicts()
    }

    fn verdicts(&self) -> Vec<Verdict> {
        self.slots
            .iter()
            .map(|slot| match slot {
                Ok(i) => self.targets[*i].verdict.unwrap_or(Verdict::TempFail),
                Err(v) => *v,
            })
            .collect()
    }
}
