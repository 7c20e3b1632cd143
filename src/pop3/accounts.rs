//! Who may log in: the [`Authenticator`] the POP3 login asks about names, passwords,
//! APOP digests and SCRAM keys, and whether a client may try at all (throttling), and
//! [`Accounts`], the one backed by the domain stores, the hashing pool, the
//! verified-login cache and the login throttle. Holds no connection state and writes
//! nothing to a client; the protocol exchange is `login`'s.

use crate::auth::cache::VerifiedCache;
use crate::auth::pool::{HashPool, PoolError};
use crate::auth::scram;
use crate::auth::ScramKeys;
use crate::auth::{self, Credentials, HashParams};
use crate::locks::BoxFuture;
use crate::store::{Account, Address, Directory, DomainStore, StoreError};
use crate::throttle::Throttle;
use std::net::IpAddr;
use std::sync::Arc;
use tracing::{info, warn};

/// A verified account and its domain's store.
pub struct Login {
    pub address: Address,
    pub store: Arc<DomainStore>,
    pub account: Box<Account>,
}

/// Whether a client may try a name now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Allowed,
    /// Too many recent failures from this address or for this name.
    Throttled,
    /// The failure counters (in Redis) could not be read: try again later.
    Unavailable,
}

/// What stops a login check from giving an answer at all.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Hasher(#[from] PoolError),
}

/// The checks behind a POP3 login. A name that is malformed, unknown or has the wrong
/// secret is `Ok(None)` alike, after the same work, so the answer tells nothing about
/// which accounts exist.
pub trait Authenticator: Send + Sync {
    /// Whether `client` may try `name` now; asked before any password work, with the
    /// name whether or not it exists.
    fn admit<'a>(&'a self, client: IpAddr, name: &'a str) -> BoxFuture<'a, Admit>;
    /// USER/PASS and AUTH PLAIN.
    fn password<'a>(
        &'a self,
        name: &'a str,
        password: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<Login>, LoginError>>;
    /// APOP: `digest` of the greeting's `timestamp` and the account's APOP secret.
    fn apop<'a>(
        &'a self,
        name: &'a str,
        timestamp: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<Login>, LoginError>>;
    /// The SCRAM-SHA-256 keys to run the exchange with: the account's, or stand-in keys
    /// no proof matches (unknown names, accounts without SCRAM keys), with the account
    /// only in the first case.
    fn scram<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(ScramKeys, Option<Login>), LoginError>>;
    /// Counts a failed login against `client` and `name`.
    fn failed<'a>(&'a self, client: IpAddr, name: Option<&'a str>) -> BoxFuture<'a, ()>;
}

/// The store-backed authenticator.
pub struct Accounts {
    pub directory: Arc<Directory>,
    /// Failed logins per client IP and per name: in process, or in Redis with the locks.
    pub throttle: Throttle,
    /// Dedicated argon2id threads: bounds concurrent hashing and keeps one working
    /// buffer per thread; also upgrades weaker stored hashes at a right password.
    pub hasher: HashPool,
    pub verified: VerifiedCache,
    /// Rounds of the stand-in SCRAM keys of unknown users (the pool has the argon2id
    /// costs of their stand-in verification).
    pub hash_params: HashParams,
    /// Key for stand-in SCRAM salts of unknown users; kept in the data dir so an unknown
    /// name gets the same salt across restarts, like a real account.
    pub secret: [u8; 32],
}

impl Accounts {
    /// Looks an address up; `None` for anything that is not an existing account.
    async fn find(&self, name: &str) -> Result<Option<Login>, LoginError> {
        let Ok(address) = Address::parse(name) else {
            return Ok(None);
        };
        let directory = self.directory.clone();
        let found = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let store = match directory.domain(&address.domain) {
                Ok(s) => s,
                Err(StoreError::UnknownDomain(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            Ok(store.account(&address.local)?.map(|account| Login {
                address,
                store,
                account: Box::new(account),
            }))
        })
        .await??;
        Ok(found)
    }

    async fn check_password(
        &self,
        name: &str,
        password: &[u8],
    ) -> Result<Option<Login>, LoginError> {
        let password = password.to_vec();
        let Some(mut login) = self.find(name).await? else {
            self.hasher.dummy(password).await?;
            return Ok(None);
        };
        let key = login.address.to_string();
        let phc = &login.account.credentials.phc;
        if self.verified.check(&key, &password, phc) {
            return Ok(Some(login));
        }
        let verified = self
            .hasher
            .verify(login.account.credentials.clone(), password)
            .await?;
        if !verified.ok {
            return Ok(None);
        }
        if let Some(new) = verified.upgraded {
            if self.store_upgrade(&login, &new).await {
                login.account.credentials = new;
            }
        }
        self.verified
            .insert(&key, &verified.password, &login.account.credentials.phc);
        Ok(Some(login))
    }

    /// Stores credentials rehashed at the configured costs in place of the ones just
    /// verified; true when they were stored. A failure only leaves the old hash in place.
    async fn store_upgrade(&self, login: &Login, new: &Credentials) -> bool {
        let store = login.store.clone();
        let local = login.address.local.clone();
        let verified_phc = login.account.credentials.phc.clone();
        let (to, scram) = (crate::auth::scheme(new), new.scram.is_some());
        let new = new.clone();
        let stored = tokio::task::spawn_blocking(move || {
            store.upgrade_credentials(&local, &verified_phc, &new)
        })
        .await;
        match stored {
            Ok(Ok(true)) => {
                let from = crate::auth::scheme(&login.account.credentials);
                info!(address = %login.address, from, to, scram,
                    "password hash upgraded to the configured cost");
                true
            }
            Ok(Ok(false)) => false,
            Ok(Err(e)) => {
                warn!(address = %login.address, error = %e, "cannot store an upgraded password hash");
                false
            }
            Err(e) => {
                warn!(address = %login.address, error = %e, "cannot store an upgraded password hash");
                false
            }
        }
    }
}

impl Authenticator for Accounts {
    fn admit<'a>(&'a self, client: IpAddr, name: &'a str) -> BoxFuture<'a, Admit> {
        Box::pin(async move {
            match self.throttle.is_blocked(client, Some(name)).await {
                Ok(false) => Admit::Allowed,
                Ok(true) => Admit::Throttled,
                Err(e) => {
                    warn!(error = %e, "cannot check login failures");
                    Admit::Unavailable
                }
            }
        })
    }

    fn password<'a>(
        &'a self,
        name: &'a str,
        password: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<Login>, LoginError>> {
        Box::pin(self.check_password(name, password))
    }

    fn apop<'a>(
        &'a self,
        name: &'a str,
        timestamp: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<Login>, LoginError>> {
        Box::pin(async move {
            Ok(self.find(name).await?.filter(|login| {
                login
                    .account
                    .credentials
                    .apop_secret
                    .as_deref()
                    .is_some_and(|secret| auth::apop::verify(timestamp, secret, digest))
            }))
        })
    }

    fn scram<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(ScramKeys, Option<Login>), LoginError>> {
        Box::pin(async move {
            let found = self.find(name).await?;
            match found
                .as_ref()
                .and_then(|l| l.account.credentials.scram.clone())
            {
                Some(keys) => Ok((keys, found)),
                None => Ok((
                    scram::fake_keys(name, &self.secret, self.hash_params.scram_iterations),
                    None,
                )),
            }
        })
    }

    fn failed<'a>(&'a self, client: IpAddr, name: Option<&'a str>) -> BoxFuture<'a, ()> {
        Box::pin(self.throttle.record_failure(client, name))
    }
}
