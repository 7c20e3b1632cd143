//! Local delivery of one message to one or more recipients: recipients and quotas are
//! checked, the body is CRLF-normalised once while it streams in, a copy is stored in
//! each recipient's domain store, and nothing is reported delivered before it is
//! flushed. Blocking (sled, `Read`): async callers use `spawn_blocking`. Speaks no
//! protocol: LMTP/SMTP map the verdicts to replies.

use crate::config::DeliveryConfig;
use crate::metrics::{self, Metrics};
use crate::store::{Account, Address, Directory, DomainStore, PendingMessage, StoreError};
use crate::wire::address::ADDRESS_EXPECTED;
use crate::wire::{CrlfNormalizer, POSTMASTER};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

/// The store's answer about one recipient (at RCPT, or per recipient after DATA); the
/// protocols turn it into their replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Hosted domain, no such account (or a name no account can have).
    UnknownUser,
    /// Not a hosted domain: we are not a relay.
    RelayDenied,
    /// The maildrop or the domain is full now; may have room later.
    QuotaFull,
    /// The message is larger than the whole quota: it will never fit.
    QuotaTooSmall,
    /// The message exceeds `delivery.max_message_bytes`.
    TooBig,
    /// A store error: try again later.
    TempFail,
    /// The file system is below `store.min_free_bytes`: try again after users (or the
    /// operator) made room.
    StorageFull,
}

impl Verdict {
    /// The verdict for a store error: `StorageFull` below the free-space reserve, else
    /// `TempFail`.
    pub fn of_store_error(e: &StoreError) -> Verdict {
        match e {
            StoreError::Full { .. } => Verdict::StorageFull,
            _ => Verdict::TempFail,
        }
    }
}

/// Why a recipient was refused before anything was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RecipientError {
    #[error("invalid address {0:?}: {ADDRESS_EXPECTED}")]
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
    #[error("invalid sender address {0:?}: {ADDRESS_EXPECTED}")]
    BadSender(String),
    #[error("recipient refused: {0}")]
    Recipient(#[from] RecipientError),
    #[error("{0}: mailbox over quota")]
    OverQuota(String),
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
            DeliveryError::OverQuota(_) => metrics::DELIVERY_OVER_QUOTA,
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
/// sender is given; returns the stored size once all copies are durable. All or
/// nothing: if any recipient is unknown or over quota, no copy is kept, so the caller
/// can retry or bounce the whole message.
pub fn deliver(
    directory: &Directory,
    quotas: Quotas,
    from: Option<&str>,
    recipients: &[String],
    mut source: impl Read,
) -> Result<u64, DeliveryError> {
    if let Some(f) = from {
        if !valid_sender(f) {
            return Err(DeliveryError::BadSender(f.to_owned()));
        }
    }
    resolve(directory, recipients)?;
    let mut batch = Batch::begin(directory, recipients);
    let mut normalizer = CrlfNormalizer::new();
    let mut input = vec![0u8; READ_CHUNK];
    let mut output = Vec::with_capacity(READ_CHUNK + READ_CHUNK / 8);
    if let Some(f) = from {
        output.extend_from_slice(b"Return-Path: <");
        output.extend_from_slice(f.as_bytes());
        output.extend_from_slice(b">\r\n");
    }
    loop {
        let n = match source.read(&mut input) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DeliveryError::Read(e)),
        };
        normalizer.push(&input[..n], &mut output);
        batch.write(&output);
        output.clear();
    }
    normalizer.finish(&mut output);
    batch.write(&output);
    let size = batch.octets();
    let Err((i, verdict)) = batch.finish_all(quotas) else {
        return Ok(size);
    };
    let r = recipients[i].clone();
    Err(match verdict {
        Verdict::UnknownUser | Verdict::RelayDenied => RecipientError::UnknownUser(r).into(),
        Verdict::QuotaFull | Verdict::QuotaTooSmall => DeliveryError::OverQuota(r),
        Verdict::StorageFull => RecipientError::Temporary(r, "mail system full".into()).into(),
        Verdict::Accepted | Verdict::TooBig | Verdict::TempFail => {
            RecipientError::Temporary(r, "storing the message failed".into()).into()
        }
    })
}

/// `deliver`, counted under `protocol` in the delivery metrics: result, latency until
/// durable (or refused) and stored bytes. Protocol front ends (local, LMTP, SMTP) call
/// this rather than `deliver`.
pub fn deliver_counted(
    metrics: &Metrics,
    protocol: &str,
    directory: &Directory,
    quotas: Quotas,
    from: Option<&str>,
    recipients: &[String],
    source: impl Read,
) -> Result<u64, DeliveryError> {
    let started = Instant::now();
    let result = deliver(directory, quotas, from, recipients, source);
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
        return Ok(fits(quotas.domain, store.stored_octets()?, size));
    }
    Ok(Verdict::Accepted)
}

/// Whether `route` may lead `rcpt` elsewhere: only `postmaster`, and only with a
/// configured `postmaster`. Pure, so callers skip the blocking `route` for the rest.
pub fn may_reroute(postmaster: &str, rcpt: &str) -> bool {
    let local = rcpt.rsplit_once('@').map_or(rcpt, |(local, _)| local);
    !postmaster.is_empty() && local.eq_ignore_ascii_case(POSTMASTER)
}

/// Where a RCPT address leads: itself, or, for `postmaster` (bare, or at a hosted domain
/// without a `postmaster` account), the configured `postmaster` address when there is
/// one. Blocking (store lookups).
pub fn route(directory: &Directory, postmaster: &str, rcpt: &str) -> String {
    if !may_reroute(postmaster, rcpt) {
        return rcpt.to_owned();
    }
    let (_, domain) = rcpt.rsplit_once('@').unwrap_or((rcpt, ""));
    if domain.is_empty() {
        return postmaster.to_owned();
    }
    match directory
        .domain(domain)
        .and_then(|store| store.account(POSTMASTER))
    {
        // The domain has no postmaster of its own.
        Ok(None) => postmaster.to_owned(),
        // Its own account, or a domain we do not host (then refused as relaying), or a
        // store error that the recipient check will report.
        Ok(Some(_)) | Err(_) => rcpt.to_owned(),
    }
}

/// The RCPT-time decision for one recipient: hosted domain, existing account, room for
/// `size` octets (the client's SIZE= estimate, or 0).
pub fn check_recipient(directory: &Directory, rcpt: &str, size: u64, quotas: Quotas) -> Verdict {
    let Some((_, domain)) = rcpt.rsplit_once('@') else {
        // Bare `postmaster` with no `delivery.postmaster` to take it.
        return Verdict::UnknownUser;
    };
    // One lookup answers "hosted?" too: an open store costs no file system access.
    let store = match directory.domain(domain) {
        Ok(store) => store,
        Err(StoreError::UnknownDomain(_) | StoreError::InvalidDomain(_)) => {
            return Verdict::RelayDenied
        }
        Err(e) => {
            tracing::warn!(recipient = rcpt, error = %e, "opening the store failed");
            return Verdict::TempFail;
        }
    };
    // A hosted domain, but a name no account can have (quoted, UTF-8, too long).
    let Ok(address) = Address::parse(rcpt) else {
        return Verdict::UnknownUser;
    };
    let result = store
        .account(&address.local)
        .and_then(|account| match account {
            None => Ok(Verdict::UnknownUser),
            Some(account) => quota_verdict(&store, &address.local, &account, size, quotas),
        })
        .and_then(|verdict| match verdict {
            // Refused at once below the free-space reserve, before the client sends DATA.
            Verdict::Accepted => store.ensure_room().map(|()| verdict),
            _ => Ok(verdict),
        });
    result.unwrap_or_else(|e| {
        tracing::warn!(recipient = rcpt, error = %e, "recipient check failed");
        Verdict::of_store_error(&e)
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
                    (None, Some(Verdict::of_store_error(&e)))
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

    /// Appends normalised message bytes to every live copy; a copy whose store fails is
    /// dropped (and will be reported as a temporary failure), the others go on.
    pub fn write(&mut self, data: &[u8]) {
        self.octets += data.len() as u64;
        for t in &mut self.targets {
            let Some(p) = &mut t.pending else { continue };
            if let Err(e) = p.write(&t.store, data) {
                tracing::warn!(recipient = %t.address, error = %e, "storing the message failed");
                t.pending = None;
                t.verdict = Some(Verdict::of_store_error(&e));
            }
        }
    }

    /// Checks every live copy against its account and quota at the final size; the
    /// ones that pass are returned for committing, the others get their verdict.
    fn check(&mut self, quotas: Quotas) -> Vec<(usize, PendingMessage)> {
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
            if verdict == Verdict::Accepted {
                ready.push((i, p));
            } else {
                t.verdict = Some(verdict);
            }
        }
        ready
    }

    /// Commits the checked copies; each commit is flushed before it counts.
    fn commit(&mut self, ready: Vec<(usize, PendingMessage)>) {
        for (i, p) in ready {
            let t = &mut self.targets[i];
            t.verdict = Some(match p.commit(&t.store) {
                Ok(_) => Verdict::Accepted,
                Err(StoreError::UnknownAccount(_)) => Verdict::UnknownUser,
                Err(e) => {
                    tracing::warn!(recipient = %t.address, error = %e, "committing the message failed");
                    Verdict::of_store_error(&e)
                }
            });
        }
    }

    /// Finishes each copy on its own (LMTP): one verdict per recipient as given to
    /// `begin`.
    pub fn finish_each(mut self, quotas: Quotas) -> Vec<Verdict> {
        let ready = self.check(quotas);
        self.commit(ready);
        self.verdicts()
    }

    /// Finishes all copies or none (SMTP and `mailgate deliver`, which have one answer
    /// for every recipient): nothing is committed unless every copy passed its checks,
    /// so a refusal never leaves some recipients with the message and the sender
    /// retrying for all. `Err` names the first refused recipient (index into the list
    /// given to `begin`) and why. Only a failing commit itself, after the checks, can
    /// leave earlier copies stored.
    pub fn finish_all(mut self, quotas: Quotas) -> Result<(), (usize, Verdict)> {
        let ready = self.check(quotas);
        let first_refusal = |verdicts: Vec<Verdict>| {
            verdicts
                .into_iter()
                .enumerate()
                .find(|(_, v)| *v != Verdict::Accepted)
        };
        let pending = self.verdicts_with(&ready);
        if let Some(refused) = first_refusal(pending) {
            return Err(refused);
        }
        self.commit(ready);
        match first_refusal(self.verdicts()) {
            Some(refused) => Err(refused),
            None => Ok(()),
        }
    }

    /// The verdicts so far, counting copies in `ready` as accepted.
    fn verdicts_with(&self, ready: &[(usize, PendingMessage)]) -> Vec<Verdict> {
        self.slots
            .iter()
            .map(|slot| match slot {
                Ok(i) if ready.iter().any(|(r, _)| r == i) => Verdict::Accepted,
                Ok(i) => self.targets[*i].verdict.unwrap_or(Verdict::TempFail),
                Err(v) => *v,
            })
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_postmaster_with_one_configured_may_be_rerouted() {
        let pm = "admin@example.com";
        for rcpt in ["postmaster", "Postmaster@example.org", "POSTMASTER@x"] {
            assert!(may_reroute(pm, rcpt), "{rcpt}");
            assert!(
                !may_reroute("", rcpt),
                "{rcpt} without a configured postmaster"
            );
        }
        for rcpt in [
            "joe@example.org",
            "postmasters@example.org",
            "post@master",
            "",
        ] {
            assert!(!may_reroute(pm, rcpt), "{rcpt}");
        }
    }
}
