//! The `mailgate` command line: `serve`, the operator commands (through the admin
//! socket when a server runs, directly on the data dir otherwise) and `check-config`.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mailgate::admin::{self, exit, Request, Response};
use mailgate::app::{self, default_cert_paths, domain_cert_paths};
use mailgate::auth::{self, Credentials};
use mailgate::config::{Config, ConfigError, LockBackendKind};
use mailgate::delivery::Quotas;
use mailgate::migrate::{dovecot, maildir, Imported};
use mailgate::provision::Plan;
use mailgate::redis_conn::RedisConn;
use mailgate::server;
use mailgate::store::{Address, AddressError};
use mailgate::tls::{self, TlsManager};
use std::collections::HashSet;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "mailgate",
    version,
    about = "TLS-first multi-tenant mail gateway"
)]
struct Cli {
    /// Configuration file (TOML); `MAILGATE_SECTION__KEY` variables override it. The
    /// container image sets `MAILGATE_CONFIG`, so `kubectl exec ... -- mailgate user add`
    /// finds the same file as `serve`.
    #[arg(long, global = true, value_name = "FILE", env = "MAILGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every configured listener until SIGTERM/SIGINT, then drain.
    Serve,
    /// Manage hosted domains.
    #[command(subcommand)]
    Domain(DomainCmd),
    /// Manage accounts.
    #[command(subcommand)]
    User(UserCmd),
    /// Deliver one RFC 5322 message from stdin (exit 0, 67 unknown user, 75 try later).
    Deliver {
        /// Envelope sender, recorded as Return-Path.
        #[arg(long, short = 'f')]
        from: Option<String>,
        #[arg(required = true)]
        recipients: Vec<String>,
    },
    /// Validate configuration and certificates, and reach Redis when locks live there.
    CheckConfig,
    /// The replicas of a cluster and where each domain lives.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Import accounts and mail from another server (safe to rerun).
    #[command(subcommand)]
    Import(ImportCmd),
    /// Print the argon2id PHC hash of a password, for `[provision] accounts_file`.
    HashPassword {
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Subcommand)]
enum ImportCmd {
    /// A Dovecot domain: the passwd-file's accounts with their password hashes, and each
    /// account's Maildir INBOX with its UIDLs, bytes and order. Reads the files here and
    /// streams them to the running server (or the data dir when none runs); a rerun
    /// adds only what is missing.
    Dovecot(DovecotArgs),
}

#[derive(Args)]
struct DovecotArgs {
    /// The domain to import into (created when absent).
    #[arg(long)]
    domain: String,
    /// Dovecot passwd-file: `user:{SCHEME}hash:uid:gid:gecos:home:shell:extra`, the
    /// user as a full address or a local part of --domain.
    #[arg(long, value_name = "FILE")]
    passwd_file: PathBuf,
    /// Where each account's Maildir is, as in Dovecot's mail_location:
    /// `[maildir:]/var/vmail/%d/%n/Maildir` (%u address, %n local part, %d domain, %h
    /// or a leading ~ the passwd-file's home, %% a percent sign).
    #[arg(long, value_name = "TEMPLATE")]
    maildir: String,
    /// Read and check everything and report what would be imported; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Dovecot's pop3_uidl_format, for mail without a stored POP3 UIDL.
    #[arg(long, value_name = "FMT", default_value = dovecot::DEFAULT_UIDL_FORMAT)]
    uidl_format: String,
    /// Dovecot's pop3_reuse_xuidl: an X-UIDL header gives the message's UIDL.
    #[arg(long)]
    reuse_xuidl: bool,
    /// Also delete here the imported mail the Maildir no longer has (deleted on Dovecot
    /// since an earlier import); for the final run of a cut-over.
    #[arg(long)]
    mirror_deletions: bool,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Every replica (reachable, version, domains homed) and every domain (home, state,
    /// epoch).
    Status {
        /// One JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Move, one at a time, every domain whose home differs from its target (its pin,
    /// else the hash over the live replicas that are not draining).
    Rebalance {
        /// Only list the moves.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        pace: MovePace,
    },
    /// Mark a replica draining (no new domains land there) and move all its domains
    /// away. Scale-down: drain the highest-numbered replica, then lower replicaCount.
    Drain {
        replica: String,
        /// Only list the moves (the replica is not marked).
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        pace: MovePace,
    },
    /// Take a replica's draining mark away.
    Undrain { replica: String },
    /// Delete, on every replica, the copies that moves left behind (renamed
    /// `.moved-<domain>-<time>` under data_dir/domains) older than the given age.
    Cleanup {
        /// Age such as 7d, 12h, 30m or 0s.
        #[arg(long, default_value = "7d")]
        older_than: String,
    },
}

impl From<MovePace> for admin::Pace {
    fn from(p: MovePace) -> admin::Pace {
        admin::Pace {
            grace_secs: p.grace,
            pause_ms: p.pause_ms,
        }
    }
}

#[derive(Args)]
struct MovePace {
    /// Seconds open sessions and deliveries get to finish once a domain is frozen.
    #[arg(long, value_name = "SECS")]
    grace: Option<u64>,
    /// Milliseconds to wait between two moves.
    #[arg(long, value_name = "MS")]
    pause_ms: Option<u64>,
}

#[derive(Subcommand)]
enum DomainCmd {
    Add {
        name: String,
    },
    List,
    Remove {
        name: String,
    },
    /// Move a domain to another replica of the cluster: copied while it is served, then
    /// frozen for the final delta only; UIDLs do not change.
    Move {
        name: String,
        /// The replica to move it to.
        #[arg(long)]
        to: String,
        /// Seconds open sessions and deliveries get to finish once it is frozen.
        #[arg(long, value_name = "SECS")]
        grace: Option<u64>,
    },
}

#[derive(Args)]
struct PasswordArgs {
    /// Read the password from the first line of stdin.
    #[arg(long)]
    password_stdin: bool,
    /// Also keep the password as an APOP secret (stored reversibly, hence opt-in).
    #[arg(long)]
    apop: bool,
}

#[derive(Subcommand)]
enum UserCmd {
    Add {
        address: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    Passwd {
        address: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    Remove {
        address: String,
    },
    List {
        domain: Option<String>,
    },
    /// Set an account's maildrop quota: octets with an optional K/M/G suffix (1024-based),
    /// `unlimited`, or `default` for `delivery.account_quota_bytes`.
    Quota {
        address: String,
        limit: String,
    },
}

/// A mistake in the arguments or in what was piped in, found before any request runs.
/// Each text names the offending value once and says what was expected.
#[derive(Debug, thiserror::Error)]
enum Mistake {
    #[error(
        "quota {0:?}: expected octets with an optional K, M, G or T suffix, `unlimited` or `default`"
    )]
    QuotaSyntax(String),
    #[error("quota {0:?}: expected a size above 0, or `unlimited` for no limit")]
    QuotaZero(String),
    #[error("quota {0:?} is too large: at most {max} octets", max = u64::MAX)]
    QuotaTooLarge(String),
    #[error("missing password: pass --password-stdin and write the password to stdin")]
    NoPasswordStdin,
    #[error("empty password on stdin: expected the password on its first line")]
    EmptyPassword,
    #[error("age {0:?}: expected a number with a unit s, m, h or d (e.g. 7d)")]
    AgeSyntax(String),
    #[error("--maildir {0:?}: {1}")]
    Template(String, dovecot::TemplateError),
    #[error("--uidl-format {0:?}: {1}")]
    UidlFormat(String, dovecot::FormatError),
    #[error("--passwd-file {0}: larger than {MAX_PASSWD_FILE} octets")]
    PasswdTooLarge(String),
}

impl Mistake {
    /// sysexits(3): a wrong argument is a usage error, an empty password bad input.
    fn exit_code(&self) -> u8 {
        match self {
            Mistake::EmptyPassword => exit::DATAERR,
            _ => exit::USAGE,
        }
    }
}

/// The exit status for an error that stopped a command: the sysexits code of the
/// mistake it reports, 1 for anything else.
fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(m) = e.downcast_ref::<Mistake>() {
        m.exit_code()
    } else if e.is::<AddressError>() {
        exit::DATAERR
    } else if e.is::<ConfigError>() {
        exit::CONFIG
    } else {
        1
    }
}

/// Parses `cluster cleanup --older-than`: a number and a unit (s, m, h, d).
fn parse_age(age: &str) -> Result<u64, Mistake> {
    let syntax = || Mistake::AgeSyntax(age.to_owned());
    let unit = age.chars().last().ok_or_else(syntax)?;
    let per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(syntax()),
    };
    let digits = &age[..age.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(syntax());
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(per))
        .ok_or_else(syntax)
}

/// Parses `mailgate user quota`'s limit: `None` for `default`, `Some(0)` for `unlimited`.
fn parse_quota(limit: &str) -> Result<Option<u64>, Mistake> {
    match limit.to_ascii_lowercase().as_str() {
        "default" => return Ok(None),
        "unlimited" => return Ok(Some(0)),
        _ => {}
    }
    let syntax = || Mistake::QuotaSyntax(limit.to_owned());
    let (digits, unit) = match limit.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&limit[..i], c.to_ascii_uppercase()),
        _ => (limit, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => return Err(syntax()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(syntax());
    }
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| Mistake::QuotaTooLarge(limit.to_owned()))?;
    if bytes == 0 {
        return Err(Mistake::QuotaZero(limit.to_owned()));
    }
    Ok(Some(bytes))
}

fn main() -> ExitCode {
    // Whatever the server or the CLI creates (stores, the secret, certificates, sockets)
    // is the server user's alone, whatever umask it was started with.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    let serving = matches!(cli.command, Cmd::Serve);
    init_logging(serving);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("mailgate: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn init_logging(serving: bool) {
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAILGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> Result<u8> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Cmd::Serve => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve(Arc::new(config)))?;
            Ok(0)
        }
        Cmd::CheckConfig => check_config(&config),
        Cmd::HashPassword { password_stdin } => {
            let password = read_password(password_stdin)?;
            println!(
                "{}",
                auth::make_credentials(&password, &config.auth.argon2)?.phc
            );
            Ok(0)
        }
        Cmd::Domain(cmd) => {
            let request = match cmd {
                DomainCmd::Add { name } => Request::DomainAdd { name },
                DomainCmd::List => Request::DomainList,
                DomainCmd::Remove { name } => Request::DomainRemove { name },
                DomainCmd::Move { name, to, grace } => {
                    if !config.cluster.enabled() {
                        bail!("not clustered: cluster.name is empty; a move needs a cluster");
                    }
                    Request::DomainMove {
                        name,
                        to,
                        grace_secs: grace,
                    }
                }
            };
            admin_command(&config, request, None)
        }
        Cmd::User(cmd) => {
            let request = match cmd {
                UserCmd::Add { address, password } => Request::UserAdd {
                    credentials: credentials(&config, &address, &password)?,
                    address,
                },
                UserCmd::Passwd { address, password } => Request::UserPasswd {
                    credentials: credentials(&config, &address, &password)?,
                    address,
                },
                UserCmd::Remove { address } => Request::UserRemove { address },
                UserCmd::List { domain } => Request::UserList { domain },
                UserCmd::Quota { address, limit } => Request::UserQuota {
                    bytes: parse_quota(&limit)?,
                    address,
                },
            };
            admin_command(&config, request, None)
        }
        Cmd::Cluster(cmd) => {
            if !config.cluster.enabled() {
                bail!("not clustered: cluster.name is empty");
            }
            let request = match cmd {
                ClusterCmd::Status { json } => Request::ClusterStatus { json },
                ClusterCmd::Rebalance { dry_run, pace } => Request::ClusterRebalance {
                    dry_run,
                    pace: pace.into(),
                },
                ClusterCmd::Drain {
                    replica,
                    dry_run,
                    pace,
                } => Request::ClusterDrain {
                    replica,
                    dry_run,
                    pace: pace.into(),
                },
                ClusterCmd::Undrain { replica } => Request::ClusterUndrain { replica },
                ClusterCmd::Cleanup { older_than } => Request::ClusterCleanup {
                    older_than_secs: parse_age(&older_than)?,
                },
            };
            admin_command(&config, request, None)
        }
        Cmd::Import(ImportCmd::Dovecot(args)) => import_dovecot(&config, args),
        Cmd::Deliver { from, recipients } => admin_command(
            &config,
            Request::Deliver { from, recipients },
            Some(Box::new(std::io::stdin().lock())),
        ),
    }
}

/// Reads the password and hashes it here, so it never crosses the admin socket.
fn credentials(config: &Config, address: &str, args: &PasswordArgs) -> Result<Credentials> {
    Address::parse(address)?;
    let password = read_password(args.password_stdin)?;
    let mut creds = auth::make_credentials(&password, &config.auth.argon2)?;
    if args.apop {
        creds.apop_secret = Some(password);
    }
    Ok(creds)
}

/// The first line of stdin, without its line end; `--password-stdin` is required so a
/// password is never expected on the command line.
fn read_password(password_stdin: bool) -> Result<String> {
    if !password_stdin {
        return Err(Mistake::NoPasswordStdin.into());
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(Mistake::EmptyPassword.into());
    }
    Ok(password.to_owned())
}

/// Sends a request to the running server, or runs it on the data dir when none runs.
fn admin_command(config: &Config, request: Request, mut body: Option<Box<dyn Read>>) -> Result<u8> {
    let socket = config.admin_socket();
    let status = match &request {
        Request::ClusterStatus { json } => Some(*json),
        _ => None,
    };
    let response = match admin::call(
        &socket,
        &request,
        body.as_mut().map(|b| &mut **b as &mut dyn Read),
    )? {
        Some(r) => r,
        // Without a local server the status is read here: Redis, and each peer over the
        // link with this replica's certificate.
        None if status.is_some() => cluster_status_here(config, status == Some(true))?,
        None => match Here::open(config)? {
            Err(refusal) => refusal,
            Ok(here) => {
                let body = body.unwrap_or_else(|| Box::new(std::io::empty()));
                here.run(request, body)?
            }
        },
    };
    Ok(print_response(&response))
}

/// The data dir opened by the CLI itself, when no server runs.
struct Here {
    directory: mailgate::store::Directory,
    quotas: Quotas,
    hashes: auth::HashParams,
    _lock: app::DataDirLock,
}

impl Here {
    /// The data dir, locked; `Ok(Err(refusal))` when working on it here would bypass a
    /// server or a cluster.
    fn open(config: &Config) -> Result<std::result::Result<Here, Response>> {
        let socket = config.admin_socket();
        let refuse = |error: String| {
            Ok(Err(Response {
                ok: false,
                lines: Vec::new(),
                error: Some(error),
                exit_code: exit::TEMPFAIL,
            }))
        };
        // On a replica of a cluster the stores here are only part of the data, and their
        // homes are recorded in Redis: changing them behind the server's back would
        // bypass both. Any running replica takes the command.
        if config.cluster.enabled() {
            return refuse(format!(
                "no server answers on {}: in a cluster, run admin commands on a replica where `mailgate serve` runs (any replica reaches every domain)",
                socket.display()
            ));
        }
        // A server whose socket is gone (removed, or not bound yet) still has the stores
        // open: never work on them behind its back.
        match app::lock_data_dir(&config.data_dir) {
            Err(e @ app::AppError::DataDirBusy { .. }) => refuse(format!(
                "{e}, but no server answers on {}: restart that server (it makes its socket again at start) or wait for it to stop",
                socket.display()
            )),
            Err(e) => Err(e.into()),
            Ok(lock) => Ok(Ok(Here {
                directory: app::open_directory(config)?,
                quotas: Quotas::from_config(&config.delivery),
                hashes: config.auth.argon2,
                _lock: lock,
            })),
        }
    }

    fn run(&self, request: Request, body: impl Read) -> Result<Response> {
        let hashes = self.hashes;
        let r = admin::execute(
            &self.directory,
            request,
            body,
            self.quotas,
            &hashes,
            None,
            None,
        );
        self.directory.flush_all()?;
        Ok(r)
    }
}

/// Largest passwd-file read (about a million accounts).
const MAX_PASSWD_FILE: u64 = 256 * 1024 * 1024;

/// Where an import's requests go: the running server's admin socket, or the data dir.
enum ImportTarget {
    Server(PathBuf),
    Here(Here),
}

impl ImportTarget {
    fn send(&self, request: Request, body: &mut dyn Read) -> Result<Response> {
        match self {
            ImportTarget::Server(socket) => match admin::call(socket, &request, Some(body))? {
                Some(r) => Ok(r),
                None => bail!("the server on {} went away", socket.display()),
            },
            ImportTarget::Here(here) => here.run(request, body),
        }
    }
}

/// How one account ended.
enum Outcome {
    Done(Imported),
    /// Checked by a dry run: new messages and their octets on disk, and the messages
    /// the running server already has (imported before, or imported and deleted).
    WouldImport(u64, u64, u64),
    /// Why, and the sysexits code it deserves.
    Failed(String, u8),
}

/// Counts for the progress output and the summary.
struct Tally {
    started: std::time::Instant,
    /// The progress bar over the accounts when stderr is a terminal.
    bar: Option<indicatif::ProgressBar>,
    accounts: u64,
    messages: u64,
    octets: u64,
    last_shown: std::time::Instant,
    /// A dry run found no running server to ask what the accounts already have.
    unasked: bool,
}

impl Tally {
    fn new(accounts: u64) -> Tally {
        use std::io::IsTerminal;
        let now = std::time::Instant::now();
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(accounts);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "import [{bar:20}] {pos}/{len} accounts, eta {eta}: {wide_msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        let tally = Tally {
            started: now,
            bar,
            accounts: 0,
            messages: 0,
            octets: 0,
            last_shown: now,
            unasked: false,
        };
        if let Some(bar) = &tally.bar {
            bar.set_message(tally.figures());
        }
        tally
    }

    /// Messages, octets and rates so far.
    fn figures(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        format!(
            "{} message(s), {:.1} MiB, {:.1} MiB/s, {:.0} message(s)/s",
            self.messages,
            self.octets as f64 / 1_048_576.0,
            self.octets as f64 / 1_048_576.0 / secs,
            self.messages as f64 / secs
        )
    }

    /// Progress on stderr: the bar on a terminal (it limits its own redraws), else a
    /// plain line every 10 seconds; `force` shows the line now.
    fn show(&mut self, force: bool) {
        if let Some(bar) = &self.bar {
            bar.set_position(self.accounts);
            bar.set_message(self.figures());
            return;
        }
        if !force && self.last_shown.elapsed() < std::time::Duration::from_secs(10) {
            return;
        }
        self.last_shown = std::time::Instant::now();
        eprintln!("import: {} account(s), {}", self.accounts, self.figures());
    }

    /// A report line on stdout, above the bar when there is one.
    fn report(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    /// A notice on stderr, above the bar when there is one.
    fn notice(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `mailgate import dovecot`: every passwd-file account in turn (hash, read the Maildir,
/// stream it), one report line each and a summary; exit 0 only when all were imported.
fn import_dovecot(config: &Config, args: DovecotArgs) -> Result<u8> {
    let domain = mailgate::wire::address::validate_domain(&args.domain)?;
    let template = dovecot::Template::parse(&args.maildir)
        .map_err(|e| Mistake::Template(args.maildir.clone(), e))?;
    let format = dovecot::UidlFormat::parse(&args.uidl_format)
        .map_err(|e| Mistake::UidlFormat(args.uidl_format.clone(), e))?;
    let source = maildir::UidlSource {
        format: &format,
        reuse_xuidl: args.reuse_xuidl,
    };
    let mut text = Vec::new();
    std::fs::File::open(&args.passwd_file)
        .and_then(|f| f.take(MAX_PASSWD_FILE + 1).read_to_end(&mut text))
        .with_context(|| format!("reading {}", args.passwd_file.display()))?;
    if text.len() as u64 > MAX_PASSWD_FILE {
        return Err(Mistake::PasswdTooLarge(args.passwd_file.display().to_string()).into());
    }
    let entries = dovecot::parse_passwd(&text, &domain);
    drop(text);
    let mut target = None;
    let mut tally = Tally::new(entries.len() as u64);
    let (mut imported, mut existing, mut failed) = (0u64, 0u64, 0u64);
    let mut worst = 0u8;
    for entry in entries {
        let (name, outcome) = match entry {
            Err(e) => {
                let name = match e.user() {
                    Some(u) if u.contains('@') => u.to_owned(),
                    Some(u) => format!("{u}@{domain}"),
                    None => format!("{}:", args.passwd_file.display()),
                };
                (name, Outcome::Failed(e.to_string(), exit::DATAERR))
            }
            Ok(entry) => {
                let name = format!("{}@{domain}", entry.local);
                let outcome = import_one(
                    config,
                    &args,
                    &domain,
                    &template,
                    source,
                    &entry,
                    &mut target,
                    &mut tally,
                )?;
                (name, outcome)
            }
        };
        let line = match outcome {
            Outcome::Done(done) => {
                let status = if done.created || done.messages > 0 {
                    imported += 1;
                    "imported"
                } else {
                    existing += 1;
                    "skipped-existing"
                };
                format!(
                    "{name}: {status}: {} message(s), {} octets, {} already there, {} deleted since{}{}{}",
                    done.messages,
                    done.octets,
                    done.existing,
                    done.deleted,
                    if args.mirror_deletions {
                        format!(", {} deleted to match the source", done.mirrored)
                    } else {
                        String::new()
                    },
                    if done.created {
                        ", account created"
                    } else {
                        ", account existed (password kept)"
                    },
                    if done.over_quota { ", OVER QUOTA" } else { "" }
                )
            }
            Outcome::WouldImport(messages, octets, known) => {
                if messages == 0 && known > 0 {
                    existing += 1;
                } else {
                    imported += 1;
                }
                format!("{name}: would import: {messages} message(s), {octets} octets on disk, {known} imported before")
            }
            Outcome::Failed(why, code) => {
                failed += 1;
                worst = worst.max(code);
                format!("{name}: failed: {why}")
            }
        };
        tally.report(line);
        tally.accounts += 1;
        tally.show(false);
    }
    tally.finish();
    println!(
        "summary: {imported} account(s) {}, {existing} skipped-existing, {failed} failed; {} message(s), {} octets read in {:.1} s{}",
        if args.dry_run { "would be imported" } else { "imported" },
        tally.messages,
        tally.octets,
        tally.started.elapsed().as_secs_f64(),
        match (args.dry_run, tally.unasked) {
            (true, false) => " (dry run: nothing changed)",
            (true, true) => " (dry run: nothing changed; no server running to ask what is already imported)",
            (false, _) => "",
        }
    );
    Ok(worst)
}

/// Hashes, reads and (unless a dry run) imports one account. `target` is opened at the
/// first account to send, creating the domain there when absent.
#[allow(clippy::too_many_arguments)]
fn import_one(
    config: &Config,
    args: &DovecotArgs,
    domain: &str,
    template: &dovecot::Template,
    source: maildir::UidlSource<'_>,
    entry: &dovecot::PasswdEntry,
    target: &mut Option<ImportTarget>,
    tally: &mut Tally,
) -> Result<Outcome> {
    let data = |why: String| Ok(Outcome::Failed(why, exit::DATAERR));
    let credentials = match auth::credentials_from_dovecot(&entry.password, &config.auth.argon2) {
        Ok(c) => c,
        Err(e) => return data(format!("passwd-file line {}: {e}", entry.line)),
    };
    if template.uses_home() && entry.home.is_empty() {
        return data(format!(
            "passwd-file line {}: the template uses the home field, which is empty",
            entry.line
        ));
    }
    let path = PathBuf::from(template.expand(&entry.local, domain, &entry.home));
    let mails = match maildir::scan(&path, source) {
        Ok(m) => m,
        Err(e) => return data(e.to_string()),
    };
    let address = format!("{}@{domain}", entry.local);
    if args.dry_run {
        // Only a running server is asked (a dry run never opens the data dir).
        let known = match admin::call(&config.admin_socket(), &known_request(&address), None) {
            Ok(Some(r)) if r.ok => r.lines.into_iter().collect(),
            Ok(None) => {
                tally.unasked = true;
                HashSet::new()
            }
            _ => HashSet::new(),
        };
        let (mut messages, mut octets) = (0, 0);
        for mail in mails.iter().filter(|m| !known.contains(&m.uidl)) {
            messages += 1;
            octets += mail.octets;
        }
        tally.messages += messages;
        tally.octets += octets;
        let before = mails.len() as u64 - messages;
        return Ok(Outcome::WouldImport(messages, octets, before));
    }
    let target = match target {
        Some(t) => t,
        None => target.insert(open_import_target(config, domain, tally)?),
    };
    // What the account already has is not sent again (a rerun reads only new mail). A
    // server that cannot say gets everything, which it skips by UIDL as before.
    let known: HashSet<String> = match target.send(known_request(&address), &mut std::io::empty()) {
        Ok(r) if r.ok => r.lines.into_iter().collect(),
        _ => HashSet::new(),
    };
    let request = Request::ImportAccount {
        address,
        credentials,
        mirror_deletions: args.mirror_deletions,
    };
    let mut frames = maildir::Frames::new(&mails, &known, args.mirror_deletions, |octets, done| {
        tally.octets += octets;
        tally.messages += u64::from(done);
        tally.show(false);
    });
    let response = match target.send(request, &mut frames) {
        Ok(r) => r,
        Err(e) => {
            return Ok(Outcome::Failed(
                format!("{e:#} (rerun to complete)"),
                exit::TEMPFAIL,
            ))
        }
    };
    if !response.ok {
        let why = response.error.unwrap_or_default();
        let code = if response.exit_code == 0 {
            exit::SOFTWARE
        } else {
            response.exit_code
        };
        return Ok(Outcome::Failed(format!("{why} (rerun to complete)"), code));
    }
    match response
        .lines
        .first()
        .map(|l| serde_json::from_str::<Imported>(l))
    {
        Some(Ok(done)) => Ok(Outcome::Done(done)),
        _ => Ok(Outcome::Failed(
            "the server's answer has no import summary (an older mailgate?)".into(),
            exit::SOFTWARE,
        )),
    }
}

fn known_request(address: &str) -> Request {
    Request::ImportKnown {
        address: address.to_owned(),
    }
}

/// The running server (else the data dir), with `domain` created when absent (its
/// notice shown above the progress bar).
fn open_import_target(config: &Config, domain: &str, tally: &Tally) -> Result<ImportTarget> {
    let socket = config.admin_socket();
    let (target, listed) = match admin::call(&socket, &Request::DomainList, None)? {
        Some(r) => (ImportTarget::Server(socket), r),
        None => match Here::open(config)? {
            Ok(here) => {
                let r = here.run(Request::DomainList, std::io::empty())?;
                (ImportTarget::Here(here), r)
            }
            Err(refusal) => bail!("{}", refusal.error.unwrap_or_default()),
        },
    };
    if !listed.ok {
        bail!("listing domains: {}", listed.error.unwrap_or_default());
    }
    if !listed.lines.iter().any(|d| d == domain) {
        let added = target.send(
            Request::DomainAdd {
                name: domain.to_owned(),
            },
            &mut std::io::empty(),
        )?;
        if !added.ok {
            bail!(
                "creating domain {domain}: {}",
                added.error.unwrap_or_default()
            );
        }
        for line in added.lines {
            tally.notice(&line);
        }
    }
    Ok(target)
}

fn cluster_status_here(config: &Config, json: bool) -> Result<Response> {
    tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let locks = &config.locks;
        let redis = mailgate::redis_conn::RedisConn::open(
            locks.redis_url.expose(),
            locks.redis_ca_file.as_deref(),
            locks.redis_sentinels().as_ref(),
            locks.redis_timeout(),
        )?;
        let metrics = Arc::new(mailgate::metrics::Metrics::new(locks.backend.name())?);
        let cluster = Arc::new(mailgate::cluster::Cluster::open(config, redis, metrics)?);
        Ok(admin::status(&cluster, json).await)
    })
}

fn print_response(r: &Response) -> u8 {
    for line in &r.lines {
        println!("{line}");
    }
    if let Some(e) = &r.error {
        eprintln!("mailgate: {e}");
    }
    if r.ok {
        0
    } else if r.exit_code == 0 {
        exit::SOFTWARE
    } else {
        r.exit_code
    }
}

fn check_config(config: &Config) -> Result<u8> {
    tls::install_crypto_provider();
    let (default, self_signed) = default_cert_paths(config);
    if self_signed && !(default.cert.exists() && default.key.exists()) {
        println!(
            "tls: no certificate configured; a self-signed one will be made at {}",
            default.cert.display()
        );
        let domains = domain_cert_paths(config);
        // The default pair does not exist yet: stand the first domain's in for it.
        if let Some(first) = domains.values().next().cloned() {
            TlsManager::load(first, domains).context("loading per-domain certificates")?;
        }
    } else {
        let manager =
            TlsManager::load(default, domain_cert_paths(config)).context("loading certificates")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for (name, not_after) in manager.expiry() {
            if not_after < now {
                bail!("certificate {name} has expired");
            }
            println!(
                "tls: certificate {name} valid for {} more days",
                (not_after - now) / 86_400
            );
        }
    }
    check_data_dir(&config.data_dir)?;
    check_provision(config)?;
    check_locks(config)?;
    check_cluster(config)?;
    if config.delivery.postmaster.is_empty() {
        println!(
            "delivery.postmaster: unset (mail to postmaster is refused for domains without a postmaster account; RFC 5321 asks for it)"
        );
    } else {
        println!("delivery.postmaster: {}", config.delivery.postmaster);
    }
    if config.lmtp.listen.starts_with("unix:") {
        server::socket_group(&config.lmtp.socket_group).map_err(anyhow::Error::msg)?;
    }
    for (name, addr) in [
        ("pop3.listen", &config.pop3.listen),
        ("pop3.tls_listen", &config.pop3.tls_listen),
        ("lmtp.listen", &config.lmtp.listen),
        ("smtp.listen", &config.smtp.listen),
        ("metrics.listen", &config.metrics.listen),
    ] {
        if addr.is_empty() {
            println!("{name}: disabled");
        } else {
            println!("{name}: {addr}");
        }
    }
    println!("configuration OK");
    Ok(0)
}

/// Reads the provisioning plan as `serve` would, so a bad accounts file fails here.
fn check_provision(config: &Config) -> Result<()> {
    let plan = Plan::load(&config.provision, &config.auth.argon2)?;
    if !plan.domains.is_empty() || config.provision.accounts_file.is_some() {
        println!(
            "provision: {} domain(s), {} account(s) created at start when absent",
            plan.domains.len(),
            plan.accounts.len()
        );
    }
    Ok(())
}

/// Reports where locks live; for Redis, that it answers (the URL shown redacted).
/// In a cluster: the replica link's certificates and the cluster secret must load.
fn check_cluster(config: &Config) -> Result<()> {
    let c = &config.cluster;
    if !c.enabled() {
        return Ok(());
    }
    mailgate::cluster::Link::load(c).context("cluster")?;
    mailgate::cluster::load_secret(&c.secret_file)?;
    println!(
        "cluster: replica {} of {} ({}); link certificates and secret OK",
        c.name,
        c.peers.len(),
        c.peers.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

fn check_locks(config: &Config) -> Result<()> {
    let locks = &config.locks;
    match locks.backend {
        LockBackendKind::Local => {
            println!("locks: local (in process; correct for a single replica only)");
            Ok(())
        }
        LockBackendKind::Redis => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let url = match locks.redis_sentinels() {
                None => locks.redis_url.to_string(),
                Some(s) => format!(
                    "{} (master {:?} named by sentinels {})",
                    locks.redis_url,
                    s.master,
                    s.addrs.join(", ")
                ),
            };
            let rtt = runtime.block_on(async {
                let conn = RedisConn::open(
                    locks.redis_url.expose(),
                    locks.redis_ca_file.as_deref(),
                    locks.redis_sentinels().as_ref(),
                    locks.redis_timeout(),
                )?;
                conn.ping().await
            });
            match rtt {
                Ok(rtt) => {
                    println!(
                        "locks: redis at {url} reachable ({:.1} ms), lock TTL {} s",
                        rtt.as_secs_f64() * 1000.0,
                        locks.ttl_secs
                    );
                    Ok(())
                }
                Err(e) => bail!("locks: redis at {url} unreachable: {e}"),
            }
        }
    }
}

fn check_data_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let meta = std::fs::metadata(dir).with_context(|| format!("data_dir {}", dir.display()))?;
        if !meta.is_dir() {
            bail!("data_dir {} is not a directory", dir.display());
        }
        if meta.permissions().readonly() {
            bail!("data_dir {} is not writable", dir.display());
        }
        if let Some(problem) = app::data_dir_mode_problem(dir)? {
            println!(
                "data_dir: warning: {problem}; serve removes other users' access when it owns the directory"
            );
        }
        println!("data_dir: {}", dir.display());
    } else {
        println!("data_dir: {} (created at first start)", dir.display());
    }
    Ok(())
}

/// Runs the server until SIGTERM or SIGINT, then until it has drained and stopped.
async fn serve(config: Arc<Config>) -> Result<()> {
    let running = app::start(config).await?;
    let signals = tokio::spawn(wait_for_signal(running.shutdown_token()));
    let result = running.wait().await;
    signals.abort();
    Ok(result?)
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "shutdown requested"),
        _ = int.recv() => info!(signal = "SIGINT", "shutdown requested"),
    }
    shutdown.cancel();
}
