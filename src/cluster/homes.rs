//! The home records in Redis: for each domain `mailgate:home:<domain>` is a hash of
//! `home` (replica name), `state` (`active|moving|held`) and `epoch`, changed only by the
//! Lua scripts here, so every change is one atomic step on the Redis server. Beside them:
//! each replica's claim on each domain it holds a copy of (`mailgate:claim:<domain>:<name>`,
//! refreshed at every announcement), a marker that a replica has announced since Redis
//! last lost its data (`mailgate:announced:<name>`), and each replica's heartbeat
//! (`mailgate:replica:<name>`, expiring). A domain being moved has state `moving` and a
//! lease (`mailgate:move:<domain>`, naming the target) that the moving home renews; when
//! the lease expires (the home stopped mid-move), the home's next announcement makes the
//! domain active again. Replicas being drained are listed in `mailgate:draining`. No
//! consensus of our own: Redis decides.

use crate::redis_conn::{RedisConn, RedisConnError};
use redis::Script;
use std::sync::LazyLock;
use std::time::Duration;

const HOME_PREFIX: &str = "mailgate:home:";
const CLAIM_PREFIX: &str = "mailgate:claim:";
const ANNOUNCED_PREFIX: &str = "mailgate:announced:";
const REPLICA_PREFIX: &str = "mailgate:replica:";
const MOVE_PREFIX: &str = "mailgate:move:";
const DRAINING_KEY: &str = "mailgate:draining";

fn move_key(domain: &str) -> String {
    format!("{MOVE_PREFIX}{domain}")
}

fn home_key(domain: &str) -> String {
    format!("{HOME_PREFIX}{domain}")
}

fn claim_prefix(domain: &str) -> String {
    format!("{CLAIM_PREFIX}{domain}:")
}

fn announced_key(replica: &str) -> String {
    format!("{ANNOUNCED_PREFIX}{replica}")
}

fn replica_key(replica: &str) -> String {
    format!("{REPLICA_PREFIX}{replica}")
}

/// A domain's state in its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Served by its home.
    Active,
    /// Being copied to another replica (part of a move): not served.
    Moving,
    /// Two replicas hold copies with the same epoch: served by neither until an operator
    /// removes one. No copy is deleted automatically.
    Held,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Moving => "moving",
            State::Held => "held",
        }
    }

    fn parse(s: &str) -> Option<State> {
        match s {
            "active" => Some(State::Active),
            "moving" => Some(State::Moving),
            "held" => Some(State::Held),
            _ => None,
        }
    }
}

/// One domain's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub home: String,
    pub state: State,
    pub epoch: u64,
}

/// What an announcement found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announced {
    /// No record: this replica's copy is now the home.
    Created,
    /// The record already named this replica.
    Confirmed,
    /// This replica's copy has a higher epoch (or the recorded home gave its claim up on a
    /// held domain): it is the home now.
    TookOver,
    /// The record names a replica with a higher epoch: this copy is not served.
    Stale,
    /// Another replica holds a copy with the same epoch: the domain was just held.
    Conflict,
    /// Already held by an earlier conflict.
    Held,
}

impl Announced {
    fn parse(s: &str) -> Option<Announced> {
        Some(match s {
            "created" => Announced::Created,
            "confirmed" => Announced::Confirmed,
            "took_over" => Announced::TookOver,
            "stale" => Announced::Stale,
            "conflict" => Announced::Conflict,
            "held" => Announced::Held,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HomesError {
    #[error(transparent)]
    Redis(#[from] RedisConnError),
    #[error("unexpected answer from redis for {0}")]
    Reply(String),
}

/// Announces a copy: KEYS[1] the record, KEYS[2] this replica's claim, KEYS[3] the move
/// lease; ARGV: this replica, its store epoch, the claim's lifetime in ms, the domain's
/// claim prefix.
static ANNOUNCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
        local me, mine = ARGV[1], tonumber(ARGV[2])
        local r = redis.call('HMGET', KEYS[1], 'home', 'state', 'epoch', 'rival')
        if not r[1] then
            redis.call('HSET', KEYS[1], 'home', me, 'state', 'active', 'epoch', mine)
            return {'created', me, 'active', tostring(mine)}
        end
        local home, state, epoch, rival = r[1], r[2], tonumber(r[3]), r[4]
        if home == me then
            if epoch < mine then
                redis.call('HSET', KEYS[1], 'epoch', mine)
                epoch = mine
            end
            if state == 'held' and (not rival or redis.call('EXISTS', ARGV[4] .. rival) == 0) then
                redis.call('HSET', KEYS[1], 'state', 'active')
                redis.call('HDEL', KEYS[1], 'rival')
                state = 'active'
            end
            if state == 'moving' and redis.call('EXISTS', KEYS[3]) == 0 then
                redis.call('HSET', KEYS[1], 'state', 'active')
                redis.call('HDEL', KEYS[1], 'target')
                state = 'active'
            end
            return {'confirmed', home, state, tostring(epoch)}
        end
        if mine > epoch then
            redis.call('HSET', KEYS[1], 'home', me, 'state', 'active', 'epoch', mine)
            redis.call('HDEL', KEYS[1], 'rival')
            return {'took_over', me, 'active', tostring(mine)}
        end
        if mine < epoch then
            return {'stale', home, state, tostring(epoch)}
        end
        if state == 'held' and redis.call('EXISTS', ARGV[4] .. home) == 0 then
            redis.call('HSET', KEYS[1], 'home', me, 'state', 'active')
            redis.call('HDEL', KEYS[1], 'rival')
            return {'took_over', me, 'active', tostring(epoch)}
        end
        if state ~= 'held' then
            redis.call('HSET', KEYS[1], 'state', 'held', 'rival', me)
            return {'conflict', home, 'held', tostring(epoch)}
        end
        return {'held', home, 'held', tostring(epoch)}
        ",
    )
});

/// Starts a move: KEYS[1] the record, KEYS[2] the lease; ARGV this replica, the epoch it
/// serves, the target, the lease in ms. Only the active home at that epoch may; the
/// epoch goes up by one. `{'ok', epoch}` or `{'refused', home, state, epoch}`.
static FREEZE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local r = redis.call('HMGET', KEYS[1], 'home', 'state', 'epoch')
        if r[1] ~= ARGV[1] or r[2] ~= 'active' or r[3] ~= ARGV[2] then
            return {'refused', r[1] or '', r[2] or '', r[3] or '0'}
        end
        local epoch = tonumber(ARGV[2]) + 1
        redis.call('HSET', KEYS[1], 'state', 'moving', 'epoch', epoch, 'target', ARGV[3])
        redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
        return {'ok', tostring(epoch)}
        ",
    )
});

/// Keeps a move's lease: KEYS[1] the record, KEYS[2] the lease; ARGV this replica, the
/// frozen epoch, the lease in ms. 1 if the move is still this replica's.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local r = redis.call('HMGET', KEYS[1], 'home', 'state', 'epoch')
        if r[1] ~= ARGV[1] or r[2] ~= 'moving' or r[3] ~= ARGV[2] then return 0 end
        return redis.call('PEXPIRE', KEYS[2], ARGV[3])
        ",
    )
});

/// Ends a move: KEYS[1] the record, KEYS[2] the lease; ARGV this replica, the frozen
/// epoch, and the new home (the target: switch, epoch + 1) or this replica (abort: active
/// again at the frozen epoch). `{'ok'}` also when the target already took the domain
/// over by announcing its installed copy; else `{'refused', home, state, epoch}`.
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local r = redis.call('HMGET', KEYS[1], 'home', 'state', 'epoch')
        local frozen = tonumber(ARGV[2])
        if r[1] == ARGV[1] and r[2] == 'moving' and tonumber(r[3]) == frozen then
            if ARGV[3] == ARGV[1] then
                redis.call('HSET', KEYS[1], 'state', 'active')
            else
                redis.call('HSET', KEYS[1], 'home', ARGV[3], 'state', 'active', 'epoch', frozen + 1)
            end
            redis.call('HDEL', KEYS[1], 'target')
            redis.call('DEL', KEYS[2])
            return {'ok'}
        end
        if ARGV[3] ~= ARGV[1] and r[1] == ARGV[3] and tonumber(r[3] or '0') > frozen then
            redis.call('DEL', KEYS[2])
            return {'ok'}
        end
        return {'refused', r[1] or '', r[2] or '', r[3] or '0'}
        ",
    )
});

/// Records a new domain's home unless it has a record: KEYS[1] the record; ARGV the
/// home. Returns the home in the record afterwards.
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local home = redis.call('HGET', KEYS[1], 'home')
        if home then return {'exists', home} end
        redis.call('HSET', KEYS[1], 'home', ARGV[1], 'state', 'active', 'epoch', 1)
        return {'created', ARGV[1]}
        ",
    )
});

/// Deletes a record (and the caller's claim) if it names the caller: KEYS[1] the record,
/// KEYS[2] the claim; ARGV the caller.
static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        redis.call('DEL', KEYS[2])
        if redis.call('HGET', KEYS[1], 'home') == ARGV[1] then
            return redis.call('DEL', KEYS[1])
        end
        return 0
        ",
    )
});

/// Reads a record and how many of the given announcement markers are missing: KEYS[1]
/// the record, KEYS[2..] the markers. `{home or '', state, epoch, missing}`.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local r = redis.call('HMGET', KEYS[1], 'home', 'state', 'epoch')
        local missing = 0
        for i = 2, #KEYS do
            if redis.call('EXISTS', KEYS[i]) == 0 then missing = missing + 1 end
        end
        return {r[1] or '', r[2] or '', r[3] or '0', tostring(missing)}
        ",
    )
});

fn record_of(home: &str, state: &str, epoch: &str) -> Option<Record> {
    Some(Record {
        home: home.to_owned(),
        state: State::parse(state)?,
        epoch: epoch.parse().ok()?,
    })
}

/// The Redis side of the homes, for one replica.
#[derive(Clone)]
pub struct Homes {
    redis: RedisConn,
    name: String,
    /// How long a claim outlives its last announcement.
    claim_ttl: Duration,
}

/// What a read found.
pub struct Read {
    pub record: Option<Record>,
    /// Some replica has not announced since Redis last lost its data: a missing record
    /// may only be missing for now.
    pub incomplete: bool,
}

impl Homes {
    pub fn new(redis: RedisConn, name: &str, claim_ttl: Duration) -> Homes {
        Homes {
            redis,
            name: name.to_owned(),
            claim_ttl,
        }
    }

    /// Announces this replica's copy of `domain` at `epoch`.
    pub async fn announce(
        &self,
        domain: &str,
        epoch: u64,
    ) -> Result<(Announced, Record), HomesError> {
        let prefix = claim_prefix(domain);
        let claim = format!("{prefix}{}", self.name);
        let answer: Vec<String> = self
            .redis
            .eval(
                &ANNOUNCE,
                &[&home_key(domain), &claim, &move_key(domain)],
                &[
                    &self.name,
                    &epoch.to_string(),
                    &self.claim_ttl.as_millis().to_string(),
                    &prefix,
                ],
            )
            .await?;
        let bad = || HomesError::Reply(format!("announce {domain}"));
        let [what, home, state, epoch] = answer.as_slice() else {
            return Err(bad());
        };
        let what = Announced::parse(what).ok_or_else(bad)?;
        let record = record_of(home, state, epoch).ok_or_else(bad)?;
        Ok((what, record))
    }

    /// Marks that this replica has announced every copy it holds.
    pub async fn announced(&self) -> Result<(), HomesError> {
        self.redis
            .query::<()>(redis::cmd("SET").arg(announced_key(&self.name)).arg("1"))
            .await?;
        Ok(())
    }

    /// The record of `domain`, and whether any of `replicas` has yet to announce.
    pub async fn read<'a>(
        &self,
        domain: &str,
        replicas: impl Iterator<Item = &'a str>,
    ) -> Result<Read, HomesError> {
        let mut keys = vec![home_key(domain)];
        keys.extend(replicas.map(announced_key));
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let answer: Vec<String> = self.redis.eval(&READ, &keys, &[]).await?;
        let bad = || HomesError::Reply(format!("read {domain}"));
        let [home, state, epoch, missing] = answer.as_slice() else {
            return Err(bad());
        };
        let record = if home.is_empty() {
            None
        } else {
            Some(record_of(home, state, epoch).ok_or_else(bad)?)
        };
        Ok(Read {
            record,
            incomplete: missing != "0",
        })
    }

    /// Records `home` for a new domain; `Err` with the existing home when it has a record.
    pub async fn create(&self, domain: &str, home: &str) -> Result<Result<(), String>, HomesError> {
        let answer: Vec<String> = self
            .redis
            .eval(&CREATE, &[&home_key(domain)], &[home])
            .await?;
        match answer.as_slice() {
            [what, _] if what == "created" => Ok(Ok(())),
            [what, existing] if what == "exists" => Ok(Err(existing.clone())),
            _ => Err(HomesError::Reply(format!("create {domain}"))),
        }
    }

    /// Forgets `domain` if this replica is its home (its copy was removed).
    pub async fn remove(&self, domain: &str) -> Result<bool, HomesError> {
        let claim = format!("{}{}", claim_prefix(domain), self.name);
        let removed: i64 = self
            .redis
            .eval(&REMOVE, &[&home_key(domain), &claim], &[&self.name])
            .await?;
        Ok(removed == 1)
    }

    /// Every record, sorted by domain.
    pub async fn all(&self) -> Result<Vec<(String, Record)>, HomesError> {
        let mut names = self.scan(&format!("{HOME_PREFIX}*")).await?;
        names.sort();
        names.dedup();
        let mut out = Vec::with_capacity(names.len());
        for key in names {
            let fields: Vec<Option<String>> = self
                .redis
                .query(
                    redis::cmd("HMGET")
                        .arg(&key)
                        .arg("home")
                        .arg("state")
                        .arg("epoch"),
                )
                .await?;
            if let [Some(home), Some(state), Some(epoch)] = fields.as_slice() {
                if let Some(record) = record_of(home, state, epoch) {
                    let domain = key.trim_start_matches(HOME_PREFIX).to_owned();
                    out.push((domain, record));
                }
            }
        }
        Ok(out)
    }

    /// Marks `domain` moving to `target` (this replica being its active home at `epoch`),
    /// with a lease of `lease`; the frozen epoch, or the record that refused it.
    pub async fn freeze(
        &self,
        domain: &str,
        epoch: u64,
        target: &str,
        lease: Duration,
    ) -> Result<Result<u64, Option<Record>>, HomesError> {
        let answer: Vec<String> = self
            .redis
            .eval(
                &FREEZE,
                &[&home_key(domain), &move_key(domain)],
                &[
                    &self.name,
                    &epoch.to_string(),
                    target,
                    &lease.as_millis().to_string(),
                ],
            )
            .await?;
        let bad = || HomesError::Reply(format!("freeze {domain}"));
        match answer.as_slice() {
            [ok, epoch] if ok == "ok" => Ok(Ok(epoch.parse().map_err(|_| bad())?)),
            [refused, home, state, epoch] if refused == "refused" => {
                Ok(Err(record_of(home, state, epoch)))
            }
            _ => Err(bad()),
        }
    }

    /// Renews the lease of this replica's move of `domain` frozen at `epoch`; `false`
    /// when the move is no longer this replica's.
    pub async fn renew_move(
        &self,
        domain: &str,
        epoch: u64,
        lease: Duration,
    ) -> Result<bool, HomesError> {
        let renewed: i64 = self
            .redis
            .eval(
                &RENEW,
                &[&home_key(domain), &move_key(domain)],
                &[
                    &self.name,
                    &epoch.to_string(),
                    &lease.as_millis().to_string(),
                ],
            )
            .await?;
        Ok(renewed == 1)
    }

    /// Ends this replica's move of `domain` frozen at `epoch`: the home becomes `home`
    /// (the target, or this replica to abort). `Err` with the record that refused it.
    pub async fn finish_move(
        &self,
        domain: &str,
        epoch: u64,
        home: &str,
    ) -> Result<Result<(), Option<Record>>, HomesError> {
        let answer: Vec<String> = self
            .redis
            .eval(
                &FINISH,
                &[&home_key(domain), &move_key(domain)],
                &[&self.name, &epoch.to_string(), home],
            )
            .await?;
        match answer.as_slice() {
            [ok] if ok == "ok" => Ok(Ok(())),
            [refused, home, state, epoch] if refused == "refused" => {
                Ok(Err(record_of(home, state, epoch)))
            }
            _ => Err(HomesError::Reply(format!("finish move of {domain}"))),
        }
    }

    /// Marks `replica` draining (`true`) or not.
    pub async fn set_draining(&self, replica: &str, draining: bool) -> Result<(), HomesError> {
        let cmd = if draining { "SADD" } else { "SREM" };
        self.redis
            .query::<i64>(redis::cmd(cmd).arg(DRAINING_KEY).arg(replica))
            .await?;
        Ok(())
    }

    /// The replicas marked draining, sorted.
    pub async fn draining(&self) -> Result<Vec<String>, HomesError> {
        let mut names: Vec<String> = self
            .redis
            .query(redis::cmd("SMEMBERS").arg(DRAINING_KEY))
            .await?;
        names.sort();
        Ok(names)
    }

    /// How many keys match `pattern`.
    pub async fn count_keys(&self, pattern: &str) -> Result<usize, HomesError> {
        let mut keys = self.scan(pattern).await?;
        keys.sort_unstable();
        keys.dedup();
        Ok(keys.len())
    }

    /// The keys matching `pattern` (a `SCAN` over the keyspace; a key may repeat).
    async fn scan(&self, pattern: &str) -> Result<Vec<String>, HomesError> {
        let (mut cursor, mut keys) = (0u64, Vec::new());
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .redis
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000),
                )
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                return Ok(keys);
            }
        }
    }

    /// Writes this replica's heartbeat, valid for `ttl`.
    pub async fn heartbeat(&self, value: &str, ttl: Duration) -> Result<(), HomesError> {
        self.redis
            .query::<()>(
                redis::cmd("SET")
                    .arg(replica_key(&self.name))
                    .arg(value)
                    .arg("PX")
                    .arg(ttl.as_millis() as u64),
            )
            .await?;
        Ok(())
    }

    /// The live heartbeats of `replicas` (`None`: expired or never written).
    pub async fn heartbeats(&self, replicas: &[&str]) -> Result<Vec<Option<String>>, HomesError> {
        if replicas.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for r in replicas {
            cmd.arg(replica_key(r));
        }
        Ok(self.redis.query(&cmd).await?)
    }
}
