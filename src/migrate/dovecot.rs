//! Dovecot's on-disk formats, parsed without I/O: passwd-file lines, `mail_location`
//! templates, Maildir file names, `dovecot-uidlist`, the `X-UIDL:` header and
//! `pop3_uidl_format`. Nothing here opens a file; `migrate::maildir` reads them.

use crate::wire::address::{validate_domain, validate_local};

/// Longest passwd-file line looked at; a longer one is reported, not parsed.
pub const MAX_PASSWD_LINE: usize = 64 * 1024;
/// Longest `dovecot-uidlist` line (a file name plus extensions).
pub const MAX_UIDLIST_LINE: usize = 8 * 1024;
/// Longest expanded UIDL or template result kept; POP3 allows 70 octets per UIDL.
pub const MAX_EXPANDED: usize = 4096;

/// One account of a passwd-file: `user:password:uid:gid:gecos:home:shell:extra`.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// 1-based line number, for the report.
    pub line: usize,
    /// Local part, lower-cased.
    pub local: String,
    /// The password field as Dovecot stores it (`{SCHEME}hash`, or a bare crypt hash).
    pub password: String,
    /// The home field (`~` in a template), empty when absent.
    pub home: String,
}

impl std::fmt::Debug for PasswdEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswdEntry")
            .field("line", &self.line)
            .field("local", &self.local)
            .field("password", &"<redacted>")
            .field("home", &self.home)
            .finish()
    }
}

/// Why a passwd-file line is not an account.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswdError {
    #[error("line {line}: longer than {MAX_PASSWD_LINE} octets")]
    TooLong { line: usize },
    #[error("line {line}: not UTF-8")]
    NotUtf8 { line: usize },
    #[error("line {line}: expected user:password[:uid:gid:gecos:home:shell:extra]")]
    Fields { line: usize },
    #[error("line {line}: user {user:?} is not a valid local part or address")]
    BadUser { line: usize, user: String },
    #[error("line {line}: user {user:?} belongs to another domain than {domain}")]
    OtherDomain {
        line: usize,
        user: String,
        domain: String,
    },
    #[error("line {line}: user {user:?} has an empty password field")]
    EmptyPassword { line: usize, user: String },
    #[error("line {line}: user {user:?} appears again (first on line {first})")]
    Duplicate {
        line: usize,
        user: String,
        first: usize,
    },
}

impl PasswdError {
    /// The user the line names, when one could be read.
    pub fn user(&self) -> Option<&str> {
        match self {
            PasswdError::BadUser { user, .. }
            | PasswdError::OtherDomain { user, .. }
            | PasswdError::EmptyPassword { user, .. }
            | PasswdError::Duplicate { user, .. } => Some(user),
            _ => None,
        }
    }
}

/// Every account line of a passwd-file for `domain`, in file order; comments (`#`) and
/// blank lines are skipped, every other line is an entry or an error naming its line.
pub fn parse_passwd(text: &[u8], domain: &str) -> Vec<Result<PasswdEntry, PasswdError>> {
    let domain = domain.to_ascii_lowercase();
    let mut seen: Vec<(String, usize)> = Vec::new();
    let mut out = Vec::new();
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.len() > MAX_PASSWD_LINE {
            out.push(Err(PasswdError::TooLong { line }));
            continue;
        }
        let Ok(text) = std::str::from_utf8(raw) else {
            out.push(Err(PasswdError::NotUtf8 { line }));
            continue;
        };
        if text.trim().is_empty() || text.trim_start().starts_with('#') {
            continue;
        }
        let entry = passwd_line(line, text, &domain).and_then(|e| {
            match seen.iter().find(|(l, _)| *l == e.local) {
                Some((_, first)) => Err(PasswdError::Duplicate {
                    line,
                    user: e.local.clone(),
                    first: *first,
                }),
                None => {
                    seen.push((e.local.clone(), line));
                    Ok(e)
                }
            }
        });
        out.push(entry);
    }
    out
}

fn passwd_line(line: usize, text: &str, domain: &str) -> Result<PasswdEntry, PasswdError> {
    let fields: Vec<&str> = text.split(':').collect();
    if fields.len() < 2 || fields.len() > 8 {
        return Err(PasswdError::Fields { line });
    }
    let user = fields[0];
    let bad_user = || PasswdError::BadUser {
        line,
        user: user.to_owned(),
    };
    let local = match user.rsplit_once('@') {
        Some((local, d)) => {
            let d = validate_domain(d).map_err(|_| bad_user())?;
            if d != domain {
                return Err(PasswdError::OtherDomain {
                    line,
                    user: user.to_owned(),
                    domain: domain.to_owned(),
                });
            }
            local
        }
        None => user,
    };
    let local = validate_local(local).ok_or_else(bad_user)?;
    if fields[1].is_empty() {
        return Err(PasswdError::EmptyPassword {
            line,
            user: user.to_owned(),
        });
    }
    Ok(PasswdEntry {
        line,
        local,
        password: fields[1].to_owned(),
        home: fields.get(5).copied().unwrap_or("").to_owned(),
    })
}

/// A `mail_location`-style path template, e.g. `maildir:/var/vmail/%d/%n/Maildir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Text(String),
    /// `%u`, the whole address.
    User,
    /// `%n`, the local part.
    Local,
    /// `%d`, the domain.
    Domain,
    /// `~` at the start, the passwd-file's home field.
    Home,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("empty Maildir template")]
    Empty,
    #[error("only maildir locations can be imported, not {0:?}")]
    NotMaildir(String),
    #[error("template option {0:?} is not supported: give the Maildir path only")]
    Option(String),
    #[error("unknown template variable {0:?}: expected %u, %n, %d, %h, %% or %{{user}}, %{{username}}, %{{domain}}, %{{home}}")]
    UnknownVariable(String),
    #[error("template ends inside a variable")]
    Unterminated,
    #[error("the template expands to a path without the account in it: use %u, %n or ~")]
    NoAccount,
}

impl Template {
    pub fn parse(template: &str) -> Result<Template, TemplateError> {
        let rest = match template.split_once(':') {
            Some((kind, rest)) if !kind.contains('/') => {
                if kind != "maildir" {
                    return Err(TemplateError::NotMaildir(kind.to_owned()));
                }
                rest
            }
            _ => template,
        };
        let (path, options) = match rest.split_once(':') {
            Some((p, o)) => (p, Some(o)),
            None => (rest, None),
        };
        for option in options.into_iter().flat_map(|o| o.split(':')) {
            // Folder layout and index location change nothing about the INBOX's files.
            let key = option.split('=').next().unwrap_or("");
            if !matches!(key, "LAYOUT" | "INDEX" | "") {
                return Err(TemplateError::Option(option.to_owned()));
            }
        }
        if path.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = path.char_indices().peekable();
        if let Some(home) = path.strip_prefix('~') {
            if home.is_empty() || home.starts_with('/') {
                parts.push(TemplatePart::Home);
                chars.next();
            }
        }
        while let Some((i, c)) = chars.next() {
            if c != '%' {
                text.push(c);
                continue;
            }
            let part = match chars.next() {
                None => return Err(TemplateError::Unterminated),
                Some((_, '%')) => {
                    text.push('%');
                    continue;
                }
                Some((_, 'u')) => TemplatePart::User,
                Some((_, 'n')) => TemplatePart::Local,
                Some((_, 'd')) => TemplatePart::Domain,
                Some((_, 'h')) => TemplatePart::Home,
                Some((_, '{')) => {
                    let close = path[i..].find('}').ok_or(TemplateError::Unterminated)?;
                    let name = &path[i + 2..i + close];
                    while chars.next_if(|(j, _)| *j <= i + close).is_some() {}
                    match name {
                        "user" => TemplatePart::User,
                        "username" => TemplatePart::Local,
                        "domain" => TemplatePart::Domain,
                        "home" => TemplatePart::Home,
                        _ => return Err(TemplateError::UnknownVariable(format!("%{{{name}}}"))),
                    }
                }
                Some((_, other)) => {
                    return Err(TemplateError::UnknownVariable(format!("%{other}")));
                }
            };
            if !text.is_empty() {
                parts.push(TemplatePart::Text(std::mem::take(&mut text)));
            }
            parts.push(part);
        }
        if !text.is_empty() {
            parts.push(TemplatePart::Text(text));
        }
        if !parts.iter().any(|p| {
            matches!(
                p,
                TemplatePart::User | TemplatePart::Local | TemplatePart::Home
            )
        }) {
            return Err(TemplateError::NoAccount);
        }
        Ok(Template { parts })
    }

    /// The Maildir path of one account.
    pub fn expand(&self, local: &str, domain: &str, home: &str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                TemplatePart::Text(t) => out.push_str(t),
                TemplatePart::User => {
                    out.push_str(local);
                    out.push('@');
                    out.push_str(domain);
                }
                TemplatePart::Local => out.push_str(local),
                TemplatePart::Domain => out.push_str(domain),
                TemplatePart::Home => out.push_str(home),
            }
        }
        out
    }

    /// Whether the template uses the home field (`~` or `%h`).
    pub fn uses_home(&self) -> bool {
        self.parts.contains(&TemplatePart::Home)
    }
}

/// A Maildir file name: `base[,S=size][,W=vsize][:2,flags]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaildirName<'a> {
    /// Everything before the info separator; the key `dovecot-uidlist` records.
    pub base: &'a str,
    /// `S=`: the file's size in octets.
    pub size: Option<u64>,
    /// `W=`: the size with CRLF line ends (what POP3 reports).
    pub vsize: Option<u64>,
    /// The flags after `:2,`.
    pub flags: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaildirNameError {
    #[error("Maildir file name {0:?} is empty or hidden")]
    Hidden(String),
    #[error("Maildir file name {0:?} has a malformed {1}= field")]
    Field(String, char),
}

impl MaildirName<'_> {
    /// Marked `T` (trashed): deleted for POP3 and never imported.
    pub fn trashed(&self) -> bool {
        self.flags.contains('T')
    }
}

pub fn parse_maildir_name(name: &str) -> Result<MaildirName<'_>, MaildirNameError> {
    if name.is_empty() || name.starts_with('.') {
        return Err(MaildirNameError::Hidden(name.to_owned()));
    }
    let (base, info) = match name.split_once(':') {
        Some((b, i)) => (b, i),
        None => (name, ""),
    };
    let flags = info.strip_prefix("2,").unwrap_or("");
    let mut size = None;
    let mut vsize = None;
    for field in base.split(',').skip(1) {
        let (key, slot) = match field.as_bytes().first() {
            Some(b'S') => ('S', &mut size),
            Some(b'W') => ('W', &mut vsize),
            _ => continue,
        };
        let Some(digits) = field[1..].strip_prefix('=') else {
            continue;
        };
        let value = digits
            .parse::<u64>()
            .ok()
            .filter(|_| digits.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| MaildirNameError::Field(name.to_owned(), key))?;
        *slot = Some(value);
    }
    if base.is_empty() {
        return Err(MaildirNameError::Hidden(name.to_owned()));
    }
    Ok(MaildirName {
        base,
        size,
        vsize,
        flags,
    })
}

/// A parsed `dovecot-uidlist` (version 3, what Dovecot 2.x writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uidlist {
    pub uid_validity: u32,
    /// The UID the next new message gets: the header's `N`, or above the last line's
    /// UID (Dovecot appends lines without rewriting the header, so `N` lags).
    pub next_uid: u32,
    /// In UID order.
    pub entries: Vec<UidEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidEntry {
    pub uid: u32,
    /// The file's base name (before `:`).
    pub base: String,
    /// `P`: a POP3 UIDL Dovecot stored for this message.
    pub pop3_uidl: Option<String>,
    /// `G`: the message's GUID.
    pub guid: Option<String>,
    /// `O`: the message's place in POP3 listings, where it differs from UID order (mail
    /// Dovecot itself imported). None when absent or not a number, as Dovecot reads it.
    pub pop3_order: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidlistError {
    #[error("dovecot-uidlist is empty")]
    Empty,
    #[error("dovecot-uidlist version {0:?} is not supported (expected 3, Dovecot 2.x)")]
    Version(String),
    #[error("dovecot-uidlist header: {0}")]
    Header(&'static str),
    #[error("dovecot-uidlist line {line}: {why}")]
    Line { line: usize, why: &'static str },
}

pub fn parse_uidlist(text: &[u8]) -> Result<Uidlist, UidlistError> {
    let mut lines = text.split(|&b| b == b'\n').enumerate();
    let header = lines
        .next()
        .map(|(_, l)| l)
        .filter(|l| !l.is_empty())
        .ok_or(UidlistError::Empty)?;
    let header = std::str::from_utf8(header).map_err(|_| UidlistError::Header("not UTF-8"))?;
    let mut fields = header.split(' ');
    let version = fields.next().unwrap_or("");
    if version != "3" {
        return Err(UidlistError::Version(version.chars().take(16).collect()));
    }
    let (mut validity, mut next) = (None, None);
    for field in fields {
        let value = field.get(1..).unwrap_or("");
        match field.as_bytes().first() {
            Some(b'V') => validity = Some(number(value).ok_or(UidlistError::Header("bad V"))?),
            Some(b'N') => next = Some(number(value).ok_or(UidlistError::Header("bad N"))?),
            _ => {}
        }
    }
    let uid_validity = validity
        .filter(|v| *v != 0)
        .ok_or(UidlistError::Header("no V (UIDVALIDITY)"))?;
    // Dovecot too calls a header with N0 broken: UIDs start at 1.
    let next_uid = match next {
        None => return Err(UidlistError::Header("no N (next UID)")),
        Some(0) => return Err(UidlistError::Header("N0 (next UID 0)")),
        Some(n) => n,
    };
    let mut entries: Vec<UidEntry> = Vec::new();
    for (i, raw) in lines {
        let line = i + 1;
        let bad = |why| UidlistError::Line { line, why };
        if raw.is_empty() {
            continue;
        }
        if raw.len() > MAX_UIDLIST_LINE {
            return Err(bad("too long"));
        }
        let text = std::str::from_utf8(raw).map_err(|_| bad("not UTF-8"))?;
        let (head, base) = text
            .split_once(" :")
            .ok_or_else(|| bad("expected `UID [extensions] :filename`"))?;
        let mut fields = head.split(' ');
        let uid = fields
            .next()
            .and_then(number)
            .filter(|u| *u != 0)
            .ok_or_else(|| bad("bad UID"))?;
        if entries.last().is_some_and(|e| e.uid >= uid) {
            return Err(bad("UIDs not ascending"));
        }
        if base.is_empty() || base.contains(['/', '\0']) || base.starts_with('.') {
            return Err(bad("bad file name"));
        }
        let (mut pop3_uidl, mut guid, mut pop3_order) = (None, None, None);
        for ext in fields.filter(|f| !f.is_empty()) {
            match ext.as_bytes()[0] {
                b'P' => pop3_uidl = Some(ext[1..].to_owned()),
                b'G' => guid = Some(ext[1..].to_owned()),
                b'O' => {
                    pop3_order = Some(&ext[1..])
                        .filter(|o| o.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|o| o.parse().ok())
                }
                _ => {}
            }
        }
        entries.push(UidEntry {
            uid,
            base: base.to_owned(),
            pop3_uidl,
            guid,
            pop3_order,
        });
    }
    let next_uid = entries
        .last()
        .map_or(next_uid, |e| next_uid.max(e.uid.saturating_add(1)));
    Ok(Uidlist {
        uid_validity,
        next_uid,
        entries,
    })
}

fn number(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The value of the first `X-UIDL:` header field in a message's header (the bytes up to
/// the first empty line; what is passed may be cut short), trimmed; `None` when absent
/// or empty.
pub fn find_x_uidl(header: &[u8]) -> Option<String> {
    for line in header.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() > 7 && line[..7].eq_ignore_ascii_case(b"x-uidl:") {
            let value = std::str::from_utf8(&line[7..]).ok()?.trim();
            return (!value.is_empty()).then(|| value.to_owned());
        }
    }
    None
}

/// A `pop3_uidl_format`, e.g. Dovecot's default `%08Xu%08Xv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidlFormat {
    parts: Vec<FormatPart>,
}

/// Dovecot's default `pop3_uidl_format`.
pub const DEFAULT_UIDL_FORMAT: &str = "%08Xu%08Xv";

#[derive(Debug, Clone, PartialEq, Eq)]
enum FormatPart {
    Text(String),
    Var {
        var: Var,
        /// Characters skipped from the start of the value.
        offset: usize,
        /// Without `zero_pad`, the value is cut to this length; with it, padded.
        width: Option<usize>,
        zero_pad: bool,
        /// `X` (and `x`): the number in hexadecimal, lower case as Dovecot prints it
        /// (`U` makes it upper case).
        hex: bool,
        case: Option<Case>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    Uid,
    UidValidity,
    Filename,
    Guid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    Lower,
    Upper,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("empty UIDL format")]
    Empty,
    #[error("UIDL format ends inside a variable")]
    Unterminated,
    #[error("unknown UIDL format variable {0:?}: expected %u, %v, %f, %g (or %{{uid}}, %{{uidvalidity}}, %{{filename}}, %{{guid}}) with modifiers 0-9 . X x L U")]
    UnknownVariable(String),
    #[error("%m (the header MD5) exists for mbox only; a Maildir has no such UIDL")]
    Md5,
}

/// What a UIDL is made of, for one message.
#[derive(Debug, Clone, Copy)]
pub struct UidlInputs<'a> {
    pub uid: u32,
    pub uid_validity: u32,
    /// The Maildir base file name (before `:`).
    pub filename: &'a str,
    /// The GUID: the uidlist's `G` record, else the base file name, as Dovecot's
    /// Maildir does.
    pub guid: &'a str,
}

impl UidlFormat {
    pub fn parse(format: &str) -> Result<UidlFormat, FormatError> {
        if format.is_empty() {
            return Err(FormatError::Empty);
        }
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = format;
        while let Some(i) = rest.find('%') {
            text.push_str(&rest[..i]);
            rest = &rest[i + 1..];
            if let Some(r) = rest.strip_prefix('%') {
                text.push('%');
                rest = r;
                continue;
            }
            let (part, r) = format_var(rest)?;
            rest = r;
            if !text.is_empty() {
                parts.push(FormatPart::Text(std::mem::take(&mut text)));
            }
            parts.push(part);
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(FormatPart::Text(text));
        }
        Ok(UidlFormat { parts })
    }

    pub fn expand(&self, inputs: &UidlInputs<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                FormatPart::Text(t) => out.push_str(t),
                FormatPart::Var {
                    var,
                    offset,
                    width,
                    zero_pad,
                    hex,
                    case,
                } => {
                    let mut value = match (var, hex) {
                        (Var::Uid, true) => format!("{:x}", inputs.uid),
                        (Var::UidValidity, true) => format!("{:x}", inputs.uid_validity),
                        (Var::Uid, false) => inputs.uid.to_string(),
                        (Var::UidValidity, false) => inputs.uid_validity.to_string(),
                        // Dovecot's X of a non-number is 0.
                        (Var::Filename | Var::Guid, true) => "0".to_owned(),
                        (Var::Filename, false) => inputs.filename.to_owned(),
                        (Var::Guid, false) => inputs.guid.to_owned(),
                    };
                    match case {
                        Some(Case::Lower) => value.make_ascii_lowercase(),
                        Some(Case::Upper) => value.make_ascii_uppercase(),
                        None => {}
                    }
                    let value: String = value.chars().skip(*offset).collect();
                    match width {
                        Some(w) if *zero_pad => {
                            for _ in value.chars().count()..*w {
                                out.push('0');
                            }
                            out.push_str(&value);
                        }
                        Some(w) => out.extend(value.chars().take(*w)),
                        None => out.push_str(&value),
                    }
                }
            }
            if out.len() > MAX_EXPANDED {
                // Cut at a character boundary: text and file names may be any UTF-8.
                let mut end = MAX_EXPANDED;
                while !out.is_char_boundary(end) {
                    end -= 1;
                }
                out.truncate(end);
                break;
            }
        }
        out
    }
}

/// One `%…` variable after its `%`: `[offset.][0][width]` modifiers, then a letter or
/// `{name}`. Returns the part and what follows it.
fn format_var(spec: &str) -> Result<(FormatPart, &str), FormatError> {
    let unknown = |s: &str| {
        FormatError::UnknownVariable(format!("%{}", s.chars().take(16).collect::<String>()))
    };
    let mut rest = spec;
    let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    let n = digits(rest);
    let (mut offset, mut width, mut zero_pad) = (0usize, None, false);
    if n > 0 || rest.starts_with('.') {
        let first = &rest[..n];
        rest = &rest[n..];
        let parse = |d: &str| d.parse::<usize>().ok().filter(|v| *v <= MAX_EXPANDED);
        if let Some(r) = rest.strip_prefix('.') {
            offset = if first.is_empty() {
                0
            } else {
                parse(first).ok_or_else(|| unknown(spec))?
            };
            let m = digits(r);
            zero_pad = r.starts_with('0') && m > 1;
            width = Some(parse(&r[..m]).ok_or_else(|| unknown(spec))?);
            rest = &r[m..];
        } else {
            zero_pad = first.starts_with('0') && n > 1;
            width = Some(parse(first).ok_or_else(|| unknown(spec))?);
        }
    }
    let (mut hex, mut case) = (false, None);
    loop {
        match rest.as_bytes().first() {
            Some(b'X' | b'x') => hex = true,
            Some(b'L') => case = Some(Case::Lower),
            Some(b'U') => case = Some(Case::Upper),
            _ => break,
        }
        rest = &rest[1..];
    }
    let (var, rest) = match rest.as_bytes().first() {
        None => return Err(FormatError::Unterminated),
        Some(b'{') => {
            let close = rest.find('}').ok_or(FormatError::Unterminated)?;
            let var = match &rest[1..close] {
                "uid" => Var::Uid,
                "uidvalidity" => Var::UidValidity,
                "filename" => Var::Filename,
                "guid" => Var::Guid,
                "md5" => return Err(FormatError::Md5),
                _ => return Err(unknown(spec)),
            };
            (var, &rest[close + 1..])
        }
        Some(b'u') => (Var::Uid, &rest[1..]),
        Some(b'v') => (Var::UidValidity, &rest[1..]),
        Some(b'f') => (Var::Filename, &rest[1..]),
        Some(b'g') => (Var::Guid, &rest[1..]),
        Some(b'm') => return Err(FormatError::Md5),
        Some(_) => return Err(unknown(spec)),
    };
    Ok((
        FormatPart::Var {
            var,
            offset,
            width,
            zero_pad,
            hex,
            case,
        },
        rest,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lines_become_entries_or_numbered_errors() {
        let text = b"# comment\n\nalice:{PLAIN}pw\nbob@Example.org:{SHA512-CRYPT}$6$x$y:1000:1000::/home/bob::\r\n\
carol@other.org:{PLAIN}x\nbroken\n:{PLAIN}x\ndave:\nalice:{PLAIN}again\n../x:{PLAIN}y\n\xff:{PLAIN}z\na:b:c:d:e:f:g:h:i\n";
        let got = parse_passwd(text, "example.org");
        assert_eq!(got.len(), 10);
        let alice = got[0].as_ref().unwrap();
        assert_eq!(
            (alice.line, alice.local.as_str(), alice.password.as_str()),
            (3, "alice", "{PLAIN}pw")
        );
        let bob = got[1].as_ref().unwrap();
        assert_eq!(
            (bob.local.as_str(), bob.home.as_str()),
            ("bob", "/home/bob")
        );
        assert_eq!(bob.password, "{SHA512-CRYPT}$6$x$y");
        assert!(matches!(
            got[2],
            Err(PasswdError::OtherDomain { line: 5, .. })
        ));
        assert_eq!(got[3], Err(PasswdError::Fields { line: 6 }));
        assert!(matches!(got[4], Err(PasswdError::BadUser { line: 7, .. })));
        assert!(matches!(
            got[5],
            Err(PasswdError::EmptyPassword { line: 8, .. })
        ));
        assert!(matches!(
            got[6],
            Err(PasswdError::Duplicate {
                line: 9,
                first: 3,
                ..
            })
        ));
        assert!(matches!(got[7], Err(PasswdError::BadUser { line: 10, .. })));
        assert_eq!(got[8], Err(PasswdError::NotUtf8 { line: 11 }));
        assert_eq!(got[9], Err(PasswdError::Fields { line: 12 }));
        assert!(!format!("{alice:?}").contains("pw"));
    }

    #[test]
    fn passwd_hostile_inputs_never_panic() {
        let long = vec![b'a'; MAX_PASSWD_LINE + 1];
        assert_eq!(
            parse_passwd(&long, "d.org"),
            vec![Err(PasswdError::TooLong { line: 1 })]
        );
        for text in [
            &b""[..],
            b"\n\n\n",
            b":",
            b"::::::::",
            b"@:x",
            b"a@:x",
            b"a@b@c:x",
            b"\0:\0",
        ] {
            let _ = parse_passwd(text, "d.org");
        }
    }

    #[test]
    fn templates_expand_every_variable() {
        let t = Template::parse("maildir:/var/vmail/%d/%n/Maildir").unwrap();
        assert_eq!(t.expand("bob", "d.org", ""), "/var/vmail/d.org/bob/Maildir");
        let t = Template::parse("/m/%{domain}/%{username}/%{user}/100%%").unwrap();
        assert_eq!(t.expand("bob", "d.org", ""), "/m/d.org/bob/bob@d.org/100%");
        let t = Template::parse("maildir:~/Maildir:LAYOUT=fs").unwrap();
        assert!(t.uses_home());
        assert_eq!(t.expand("bob", "d.org", "/home/bob"), "/home/bob/Maildir");
        assert_eq!(
            Template::parse("/m/%h/x").unwrap().expand("a", "d", "/h"),
            "/m//h/x"
        );
    }

    #[test]
    fn templates_reject_what_they_cannot_expand() {
        assert_eq!(
            Template::parse("/m/%z/x"),
            Err(TemplateError::UnknownVariable("%z".into()))
        );
        assert_eq!(
            Template::parse("/m/%{nope}/x"),
            Err(TemplateError::UnknownVariable("%{nope}".into()))
        );
        assert_eq!(Template::parse("/m/%"), Err(TemplateError::Unterminated));
        assert_eq!(
            Template::parse("/m/%{user"),
            Err(TemplateError::Unterminated)
        );
        assert_eq!(
            Template::parse("mbox:/m/%n"),
            Err(TemplateError::NotMaildir("mbox".into()))
        );
        assert_eq!(
            Template::parse("/m/%n:CONTROL=/c"),
            Err(TemplateError::Option("CONTROL=/c".into()))
        );
        assert_eq!(Template::parse("/var/mail"), Err(TemplateError::NoAccount));
        assert_eq!(Template::parse("maildir:"), Err(TemplateError::Empty));
        assert_eq!(Template::parse("/m/%d"), Err(TemplateError::NoAccount));
        for t in ["%{", "%{}", "~", "%%%", "é%nü"] {
            let _ = Template::parse(t);
        }
    }

    #[test]
    fn maildir_names_give_base_sizes_and_flags() {
        let n = parse_maildir_name("1276528487.M364837P9451.host,S=1355,W=1394:2,ST").unwrap();
        assert_eq!(n.base, "1276528487.M364837P9451.host,S=1355,W=1394");
        assert_eq!((n.size, n.vsize, n.flags), (Some(1355), Some(1394), "ST"));
        assert!(n.trashed());
        let n = parse_maildir_name("123.abc.host").unwrap();
        assert_eq!((n.base, n.size, n.flags), ("123.abc.host", None, ""));
        assert!(!n.trashed());
        assert!(parse_maildir_name(".hidden").is_err());
        assert!(parse_maildir_name("").is_err());
        assert!(parse_maildir_name(":2,S").is_err());
        assert!(parse_maildir_name("a,S=12x").is_err());
        assert!(parse_maildir_name("a,S=-1").is_err());
        assert!(parse_maildir_name("a,W=99999999999999999999999").is_err());
        assert!(parse_maildir_name("a,Sx,Wy,S:2,").is_ok());
    }

    #[test]
    fn uidlists_parse_in_uid_order_with_pop3_records() {
        let text = b"3 V1700000000 N5 G3085f01b7f11094c501100008c4a11c1\n\
1 :100.M1P1.h,S=10\n2 W12 P0000abcd :101.M2P1.h\n4 G00ff :102.M3P1.h\n";
        let list = parse_uidlist(text).unwrap();
        assert_eq!((list.uid_validity, list.next_uid), (1_700_000_000, 5));
        let uids: Vec<u32> = list.entries.iter().map(|e| e.uid).collect();
        assert_eq!(uids, [1, 2, 4]);
        assert_eq!(list.entries[1].pop3_uidl.as_deref(), Some("0000abcd"));
        assert_eq!(list.entries[2].guid.as_deref(), Some("00ff"));
        assert_eq!(list.entries[0].base, "100.M1P1.h,S=10");
        // Dovecot appends lines without rewriting the header's N.
        let list = parse_uidlist(b"3 V17 N1\n1 :a\n2 :b\n").unwrap();
        assert_eq!(list.next_uid, 3);
        // POP3 order records; one that is not a number counts as none, as in Dovecot.
        let list = parse_uidlist(b"3 V17 N4\n1 O2 :a\n2 O+1 :b\n3 O1 W9 :c\n").unwrap();
        let orders: Vec<Option<u64>> = list.entries.iter().map(|e| e.pop3_order).collect();
        assert_eq!(orders, [Some(2), None, Some(1)]);
    }

    #[test]
    fn malformed_uidlists_are_refused() {
        let cases: &[&[u8]] = &[
            b"",
            b"1 1700000000 5\n",
            b"3 N5\n",
            b"3 V0 N5\n",
            b"3 V17 Nx\n",
            b"3 V17\n",
            b"3 V17 N5\n2 :a\n1 :b\n",
            b"3 V17 N5\n1 :a\n1 :b\n",
            b"3 V17 N5\nx :a\n",
            b"3 V17 N5\n0 :a\n",
            b"3 V17 N5\n1 a\n",
            b"3 V17 N5\n1 :\n",
            b"3 V17 N5\n1 :../x\n",
            b"3 V17 N5\n1 :\xff\n",
            b"3 V99999999999 N5\n",
            // Found by fuzzing (dovecot_uidlist): accepted, it gave unlisted files UID 0.
            b"3 V17 N0\n",
            b"3 V17 N0\n1 :a\n",
        ];
        for case in cases {
            assert!(
                parse_uidlist(case).is_err(),
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
        let long = [b"3 V1 N9\n1 :".as_slice(), &vec![b'a'; MAX_UIDLIST_LINE]].concat();
        assert!(parse_uidlist(&long).is_err());
    }

    #[test]
    fn x_uidl_is_found_in_the_header_only() {
        assert_eq!(
            find_x_uidl(b"From: a\r\nx-uidl:  abc \r\n\r\nX-UIDL: no"),
            Some("abc".into())
        );
        assert_eq!(find_x_uidl(b"From: a\n\nX-UIDL: body"), None);
        assert_eq!(find_x_uidl(b"X-UIDL:\n"), None);
        assert_eq!(find_x_uidl(b"X-UIDL"), None);
        assert_eq!(find_x_uidl(b""), None);
    }

    fn inputs() -> UidlInputs<'static> {
        UidlInputs {
            uid: 0x2a,
            uid_validity: 0x6560_ab1f,
            filename: "1700.M1P2.host,S=10",
            guid: "1700.M1P2.host,S=10",
        }
    }

    #[test]
    fn uidl_formats_expand_like_dovecot() {
        let f = UidlFormat::parse(DEFAULT_UIDL_FORMAT).unwrap();
        assert_eq!(f.expand(&inputs()), "0000002a6560ab1f");
        let f = UidlFormat::parse("%08XUu%08xv").unwrap();
        assert_eq!(f.expand(&inputs()), "0000002A6560ab1f");
        assert_eq!(
            UidlFormat::parse("%v.%u").unwrap().expand(&inputs()),
            "1700834079.42"
        );
        assert_eq!(
            UidlFormat::parse("%f").unwrap().expand(&inputs()),
            "1700.M1P2.host,S=10"
        );
        assert_eq!(
            UidlFormat::parse("%4f-%g").unwrap().expand(&inputs()),
            "1700-1700.M1P2.host,S=10"
        );
        assert_eq!(
            UidlFormat::parse("%5.4f").unwrap().expand(&inputs()),
            "M1P2"
        );
        assert_eq!(
            UidlFormat::parse("%{uid}:%08X{uidvalidity}%%")
                .unwrap()
                .expand(&inputs()),
            "42:6560ab1f%"
        );
        assert_eq!(
            UidlFormat::parse("x%Uf").unwrap().expand(&inputs()),
            "x1700.M1P2.HOST,S=10"
        );
    }

    #[test]
    fn uidl_formats_reject_unknown_variables() {
        assert_eq!(UidlFormat::parse("%m"), Err(FormatError::Md5));
        assert_eq!(UidlFormat::parse("%{md5}"), Err(FormatError::Md5));
        assert!(matches!(
            UidlFormat::parse("%q"),
            Err(FormatError::UnknownVariable(_))
        ));
        assert!(matches!(
            UidlFormat::parse("%{x}"),
            Err(FormatError::UnknownVariable(_))
        ));
        assert_eq!(UidlFormat::parse("%08"), Err(FormatError::Unterminated));
        assert_eq!(UidlFormat::parse("%{uid"), Err(FormatError::Unterminated));
        assert_eq!(UidlFormat::parse(""), Err(FormatError::Empty));
        assert!(UidlFormat::parse("%99999999999999999999u").is_err());
        let huge = UidlFormat::parse("%04096u%04096u%04096u").unwrap();
        assert!(huge.expand(&inputs()).len() <= MAX_EXPANDED);
        // Found by fuzzing (maildir_name): the cut fell inside a two-octet character and
        // panicked.
        let cut = UidlFormat::parse("%04095u\u{e9}x")
            .unwrap()
            .expand(&inputs());
        assert_eq!(cut.len(), MAX_EXPANDED - 1);
        assert!(cut.bytes().all(|b| b == b'0' || b == b'4' || b == b'2'));
        let long_name = UidlInputs {
            filename: &"\u{2603}".repeat(MAX_EXPANDED),
            ..inputs()
        };
        let cut = UidlFormat::parse("x%f").unwrap().expand(&long_name);
        assert_eq!(cut.len(), MAX_EXPANDED);
        assert!(cut.starts_with("x\u{2603}"));
        for f in ["%.", "%.u", "%0.u", "%X", "%XL", "%é", "%{é}"] {
            let _ = UidlFormat::parse(f).map(|f| f.expand(&inputs()));
        }
    }
}
