//! Start-up provisioning: the domains of `[provision] domains` and the accounts of
//! `[provision] accounts_file` (`address PHC-hash` lines), created by `serve` before it
//! listens when they are absent. What exists is never changed: an account keeps its
//! password and mail, and nothing is removed when a line goes away.
//! Must not log, print or return a password hash, not even in an error.

use crate::auth::{self, Credentials, HashParams};
use crate::config::ProvisionConfig;
use crate::store::{self, Account, Address, Directory, StoreError};
use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest accounts file read (a line is about 130 octets: some 100,000 accounts).
pub const MAX_ACCOUNTS_FILE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("accounts file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("accounts file {path} is larger than {MAX_ACCOUNTS_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    /// A line that cannot be used; the message names what is wrong, never the hash.
    #[error("accounts file {path}, line {line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("provisioning {what}: {source}")]
    Store { what: String, source: StoreError },
}

/// One account to create when absent.
pub struct PlannedAccount {
    pub address: Address,
    /// The line of the accounts file it came from.
    pub line: usize,
    credentials: Credentials,
}

/// Shows the address and line only: the credentials hold a password hash.
impl std::fmt::Debug for PlannedAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlannedAccount")
            .field("address", &self.address)
            .field("line", &self.line)
            .finish_non_exhaustive()
    }
}

/// Everything `[provision]` asks for, read and checked; nothing is touched yet.
#[derive(Debug, Default)]
pub struct Plan {
    /// Validated, lower-cased, without duplicates, in the order given.
    pub domains: Vec<String>,
    pub accounts: Vec<PlannedAccount>,
}

/// What `apply` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub domains_created: Vec<String>,
    pub accounts_created: Vec<String>,
    /// Accounts that already existed and were left as they are.
    pub accounts_kept: usize,
}

impl Plan {
    /// Reads and checks the configuration: domain names, and every line of the accounts
    /// file (address, argon2id PHC hash, domain listed, no address twice).
    pub fn load(config: &ProvisionConfig, hashes: &HashParams) -> Result<Plan, ProvisionError> {
        let mut domains = Vec::new();
        for name in &config.domains {
            let name = store::validate_domain(name).map_err(|source| ProvisionError::Store {
                what: "domains".into(),
                source: source.into(),
            })?;
            if !domains.contains(&name) {
                domains.push(name);
            }
        }
        let accounts = match &config.accounts_file {
            Some(path) => {
                let listed: BTreeSet<&str> = domains.iter().map(String::as_str).collect();
                parse_accounts(path, &read_bounded(path)?, &listed, hashes)?
            }
            None => Vec::new(),
        };
        Ok(Plan { domains, accounts })
    }

    /// The part of the plan for `domains` only (a replica of a cluster provisions the
    /// domains it is home to).
    pub fn only(self, domains: &[String]) -> Plan {
        Plan {
            domains: self
                .domains
                .into_iter()
                .filter(|d| domains.contains(d))
                .collect(),
            accounts: self
                .accounts
                .into_iter()
                .filter(|a| domains.contains(&a.address.domain))
                .collect(),
        }
    }

    /// Creates the domains and accounts that are absent (blocking: sled). Runs before
    /// the listeners exist, so nothing else writes the stores meanwhile; a domain or
    /// account that appears anyway counts as existing.
    pub fn apply(&self, directory: &Directory) -> Result<Report, ProvisionError> {
        let mut report = Report::default();
        for name in &self.domains {
            match directory.add_domain(name) {
                Ok(()) => report.domains_created.push(name.clone()),
                Err(StoreError::DomainExists(_)) => {}
                Err(source) => {
                    return Err(ProvisionError::Store {
                        what: format!("domain {name}"),
                        source,
                    })
                }
            }
        }
        for planned in &self.accounts {
            let address = &planned.address;
            let failed = |source| ProvisionError::Store {
                what: format!("account {address}"),
                source,
            };
            let store = directory.domain(&address.domain).map_err(failed)?;
            if store.account(&address.local).map_err(failed)?.is_some() {
                report.accounts_kept += 1;
                continue;
            }
            let account = Account::new(planned.credentials.clone());
            match store.create_account(&address.local, &account) {
                Ok(()) => report.accounts_created.push(address.to_string()),
                Err(StoreError::AccountExists(_)) => report.accounts_kept += 1,
                Err(source) => return Err(failed(source)),
            }
        }
        Ok(report)
    }
}

/// Reads the whole file, refusing one larger than [`MAX_ACCOUNTS_FILE_BYTES`].
fn read_bounded(path: &Path) -> Result<String, ProvisionError> {
    let read_error = |source| ProvisionError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_ACCOUNTS_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_ACCOUNTS_FILE_BYTES {
        return Err(ProvisionError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    // Not echoed: a non-UTF-8 file may be anything, including key material.
    String::from_utf8(bytes).map_err(|_| {
        read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8 text",
        ))
    })
}

/// Parses `address PHC-hash` lines (fields separated by spaces or tabs; blank lines and
/// lines starting with `#` are skipped). `domains` are the hosted domains an address
/// may belong to.
pub fn parse_accounts(
    path: &Path,
    text: &str,
    domains: &BTreeSet<&str>,
    hashes: &HashParams,
) -> Result<Vec<PlannedAccount>, ProvisionError> {
    let mut accounts = Vec::new();
    let mut seen: HashMap<Address, usize> = HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let bad = |message: String| ProvisionError::Line {
            path: path.to_path_buf(),
            line,
            message,
        };
        let content = raw.trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let mut fields = content.split_ascii_whitespace();
        let (Some(address), Some(phc), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad(
                "expected two fields, `address PHC-hash`, separated by spaces".into(),
            ));
        };
        // The first field is not echoed when invalid: it may be a misplaced hash.
        let address = Address::parse(address)
            .map_err(|_| bad("the first field is not a valid address (local@domain)".into()))?;
        if !domains.contains(address.domain.as_str()) {
            return Err(bad(format!(
                "domain of {address} is not in provision.domains"
            )));
        }
        let credentials = auth::credentials_from_stored_hash(phc, hashes)
            .map_err(|e| bad(format!("password hash of {address}: {e}")))?;
        if let Some(first) = seen.insert(address.clone(), line) {
            return Err(bad(format!("{address} is already on line {first}")));
        }
        accounts.push(PlannedAccount {
            address,
            line,
            credentials,
        });
    }
    Ok(accounts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{make_credentials, verify_password};
    use crate::store::StoreOptions;

    fn phc(password: &str) -> String {
        make_credentials(password, &HashParams::cheap())
            .unwrap()
            .phc
    }

    fn config(dir: &Path, domains: &[&str], accounts: Option<&str>) -> ProvisionConfig {
        let accounts_file = accounts.map(|text| {
            let path = dir.join("accounts");
            std::fs::write(&path, text).unwrap();
            path
        });
        ProvisionConfig {
            domains: domains.iter().map(|d| d.to_string()).collect(),
            accounts_file,
        }
    }

    #[test]
    fn parses_lines_comments_blanks_and_tabs() {
        let (a, b) = (phc("a"), phc("b"));
        let text = format!(
            "# accounts\n\n  joe@Example.ORG {a}\r\nann@example.net\t\t{b}  \n   # indented comment\n"
        );
        let domains = BTreeSet::from(["example.org", "example.net"]);
        let accounts =
            parse_accounts(Path::new("f"), &text, &domains, &HashParams::cheap()).unwrap();
        let found: Vec<(String, usize)> = accounts
            .iter()
            .map(|p| (p.address.to_string(), p.line))
            .collect();
        assert_eq!(
            found,
            vec![
                ("joe@example.org".to_string(), 3),
                ("ann@example.net".to_string(), 4)
            ]
        );
        assert!(verify_password(
            &accounts[0].credentials,
            b"a",
            &HashParams::cheap()
        ));
        assert!(accounts[0].credentials.scram.is_none());
        let shown = format!("{accounts:?}");
        assert!(!shown.contains(&a) && !shown.contains("argon2"), "{shown}");
    }

    #[test]
    fn bad_lines_name_file_and_line_but_never_the_hash() {
        let good = phc("pw");
        let secret_tail = &good[good.len() - 16..];
        let domains = BTreeSet::from(["example.org"]);
        let cases: Vec<(String, &str)> = vec![
            ("joe@example.org".into(), "two fields"),
            (format!("joe@example.org {good} extra"), "two fields"),
            (format!("{good} joe@example.org"), "not a valid address"),
            (format!("joe {good}"), "not a valid address"),
            (format!("../x@example.org {good}"), "not a valid address"),
            (
                format!("joe@example.net {good}"),
                "example.net is not in provision.domains",
            ),
            (
                format!(
                    "joe@example.org {}",
                    good.replace("$argon2id$", "$argon2i$")
                ),
                "only argon2id",
            ),
            (
                format!("joe@example.org {}", good.replace("m=1024,", "m=1048576,")),
                "costs above the accepted maximum (m=1048576, t=1, p=1)",
            ),
            (
                format!("joe@example.org {}", good.replace("t=1,", "t=1000,")),
                "costs above the accepted maximum",
            ),
            (
                format!("joe@example.org {}", good.replace("p=1$", "p=64$")),
                "costs above the accepted maximum",
            ),
            (
                format!("joe@example.org {}", &good[..good.len() - 44]),
                "password hash of joe@example.org",
            ),
            (
                "joe@example.org $2y$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy"
                    .into(),
                "not a PHC string",
            ),
            (
                format!("joe@example.org {good}\nJOE@example.org {good}"),
                "line 3: joe@example.org is already on line 2",
            ),
        ];
        for (text, expected) in cases {
            let text = format!("# header\n{text}\n");
            let err = parse_accounts(
                Path::new("/etc/mailgate/accounts"),
                &text,
                &domains,
                &HashParams::cheap(),
            )
            .expect_err(&text)
            .to_string();
            assert!(
                err.starts_with("accounts file /etc/mailgate/accounts, line "),
                "{err}"
            );
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(!err.contains(secret_tail), "hash echoed: {err}");
            assert!(!err.contains("$argon2") && !err.contains("$2y$"), "{err}");
        }
        let err = parse_accounts(
            Path::new("f"),
            &format!("# a\n\njoe@example.org {good}\nx\n"),
            &domains,
            &HashParams::cheap(),
        )
        .expect_err("line 4")
        .to_string();
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn load_checks_domains_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Plan::load(
            &config(
                dir.path(),
                &["Example.org", "example.org", "example.net"],
                None,
            ),
            &HashParams::cheap(),
        )
        .unwrap();
        assert_eq!(plan.domains, vec!["example.org", "example.net"]);
        assert!(plan.accounts.is_empty());

        let err = Plan::load(
            &config(dir.path(), &["bad domain"], None),
            &HashParams::cheap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bad domain"), "{err}");

        let missing = ProvisionConfig {
            domains: vec![],
            accounts_file: Some(dir.path().join("absent")),
        };
        let err = Plan::load(&missing, &HashParams::cheap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("absent") && err.contains("No such file"),
            "{err}"
        );

        let huge = dir.path().join("huge");
        let file = std::fs::File::create(&huge).unwrap();
        file.set_len(MAX_ACCOUNTS_FILE_BYTES + 1).unwrap();
        let err = Plan::load(
            &ProvisionConfig {
                domains: vec![],
                accounts_file: Some(huge),
            },
            &HashParams::cheap(),
        )
        .unwrap_err();
        assert!(matches!(err, ProvisionError::TooLarge { .. }), "{err}");

        let binary = dir.path().join("binary");
        std::fs::write(&binary, [0xff, 0xfe, b'\n']).unwrap();
        let err = Plan::load(
            &ProvisionConfig {
                domains: vec![],
                accounts_file: Some(binary),
            },
            &HashParams::cheap(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn apply_creates_what_is_absent_and_never_changes_an_account() {
        let dir = tempfile::tempdir().unwrap();
        let directory = Directory::open(&dir.path().join("data"), StoreOptions::default()).unwrap();
        directory.add_domain("example.net").unwrap();
        let store = directory.domain("example.net").unwrap();
        let existing = make_credentials("kept", &HashParams::cheap()).unwrap();
        store
            .create_account("ann", &Account::new(existing.clone()))
            .unwrap();

        let text = format!(
            "joe@example.org {}\nann@example.net {}\n",
            phc("joe's"),
            phc("replaced?")
        );
        let cfg = config(dir.path(), &["example.org", "example.net"], Some(&text));
        let report = Plan::load(&cfg, &HashParams::cheap())
            .unwrap()
            .apply(&directory)
            .unwrap();
        assert_eq!(
            report,
            Report {
                domains_created: vec!["example.org".into()],
                accounts_created: vec!["joe@example.org".into()],
                accounts_kept: 1,
            }
        );
        let ann = store.account("ann").unwrap().unwrap();
        assert!(
            ann.credentials == existing,
            "an existing account was changed"
        );
        let joe = directory
            .domain("example.org")
            .unwrap()
            .account("joe")
            .unwrap()
            .unwrap();
        assert!(verify_password(
            &joe.credentials,
            b"joe's",
            &HashParams::cheap()
        ));

        // A second start changes nothing.
        let again = Plan::load(&cfg, &HashParams::cheap())
            .unwrap()
            .apply(&directory)
            .unwrap();
        assert_eq!(
            again,
            Report {
                accounts_kept: 2,
                ..Report::default()
            }
        );
        let mut listed = directory.list_domains().unwrap();
        listed.sort();
        assert_eq!(listed, vec!["example.net", "example.org"]);
    }
}
