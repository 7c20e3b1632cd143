//! The names of a Dovecot import: a Maildir file name (`parse_maildir_name`), a
//! `mail_location` template (`Template`) and a `pop3_uidl_format` (`UidlFormat`). The
//! input is three lines: name, template, format. Properties: no panics; a parsed name
//! splits as a plain reading says (base before the first `:`, flags after `2,`, `S=`/`W=`
//! from the base's last such fields, trashed iff flag `T`) and a name written the way
//! Dovecot writes one parses back to its parts; a parsed template always expands to a
//! path holding the account, and a valid user name (local part and domain) can neither
//! add or remove a path level nor make a `..` component; a format with no `%` expands to
//! itself, Dovecot's default to `%08x%08x` of UID and UIDVALIDITY, and every expansion is
//! bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::migrate::dovecot::{
    parse_maildir_name, MaildirNameError, Template, TemplateError, UidlFormat, UidlInputs,
    DEFAULT_UIDL_FORMAT, MAX_EXPANDED,
};
use mailgate::wire::address::{validate_domain, validate_local};

fn check_name(name: &str) {
    let parsed = match parse_maildir_name(name) {
        Ok(parsed) => parsed,
        Err(MaildirNameError::Hidden(n)) => {
            assert_eq!(n, name);
            assert!(name.is_empty() || name.starts_with('.') || name.starts_with(':'));
            return;
        }
        Err(MaildirNameError::Field(n, key)) => {
            assert_eq!(n, name);
            let base = name.split(':').next().expect("split gives one part");
            let prefix = format!("{key}=");
            assert!(base
                .split(',')
                .skip(1)
                .filter_map(|f| f.strip_prefix(&prefix))
                .any(|v| v.is_empty()
                    || !v.bytes().all(|b| b.is_ascii_digit())
                    || v.parse::<u64>().is_err()));
            return;
        }
    };
    let (base, info) = name.split_once(':').unwrap_or((name, ""));
    assert_eq!(parsed.base, base);
    assert!(!base.is_empty() && !base.starts_with('.'));
    assert_eq!(parsed.flags, info.strip_prefix("2,").unwrap_or(""));
    assert_eq!(parsed.trashed(), parsed.flags.contains('T'));
    let field = |key: &str| {
        base.split(',')
            .skip(1)
            .filter_map(|f| f.strip_prefix(key))
            .last()
            .map(|v| v.parse::<u64>().expect("a parsed size is a number"))
    };
    assert_eq!(parsed.size, field("S="));
    assert_eq!(parsed.vsize, field("W="));
}

/// A name as Dovecot writes it, from a fuzzed stem and flags: parses back to its parts.
fn written_name(stem: &str, size: u64, vsize: u64, flags: &str) {
    if stem.is_empty() || stem.starts_with('.') || stem.contains([',', ':']) {
        return;
    }
    let name = format!("{stem},S={size},W={vsize}:2,{flags}");
    let parsed = parse_maildir_name(&name).expect("a name Dovecot writes");
    assert_eq!(parsed.base, format!("{stem},S={size},W={vsize}"));
    assert_eq!((parsed.size, parsed.vsize), (Some(size), Some(vsize)));
    assert_eq!(parsed.flags, flags);
}

/// The number of `/` and of `..` components of a path.
fn shape(path: &str) -> (usize, usize) {
    (
        path.matches('/').count(),
        path.split('/').filter(|c| *c == "..").count(),
    )
}

fn check_template(template: &str, name: &str) {
    let parsed = match Template::parse(template) {
        Ok(t) => t,
        Err(e) => {
            if let TemplateError::NotMaildir(kind) = e {
                assert!(template.starts_with(&format!("{kind}:")) && kind != "maildir");
            }
            return;
        }
    };
    // The account is in the path: its local part, its address or its home.
    let path = parsed.expand("qz7local", "qz7domain.example", "/qz7home");
    assert!(
        path.contains("qz7local") || path.contains("/qz7home"),
        "{path:?}"
    );
    assert!(path.len() <= template.len() * 32 + 64);
    if parsed.uses_home() {
        return;
    }
    // A valid user name cannot add a path level or a `..` component.
    let (local, domain) = name.rsplit_once('@').unwrap_or((name, "example.org"));
    let (Some(local), Ok(domain)) = (validate_local(local), validate_domain(domain)) else {
        return;
    };
    let reference = parsed.expand("x", "x", "");
    let expanded = parsed.expand(&local, &domain, "");
    assert_eq!(shape(&expanded), shape(&reference), "{expanded:?}");
}

fn check_format(format: &str, name: &str, seed: &[u8]) {
    let number = |at: usize| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed.get(at + i).copied().unwrap_or(0);
        }
        u32::from_le_bytes(b)
    };
    let inputs = UidlInputs {
        uid: number(0),
        uid_validity: number(4),
        filename: name,
        guid: name.split(',').next().unwrap_or(name),
    };
    let default = UidlFormat::parse(DEFAULT_UIDL_FORMAT).expect("the default parses");
    assert_eq!(
        default.expand(&inputs),
        format!("{:08x}{:08x}", inputs.uid, inputs.uid_validity)
    );
    let Ok(parsed) = UidlFormat::parse(format) else {
        assert!(format.is_empty() || format.contains('%'));
        return;
    };
    let expanded = parsed.expand(&inputs);
    assert!(expanded.len() <= MAX_EXPANDED);
    if !format.contains('%') {
        assert_eq!(expanded, format);
    }
    assert_eq!(parsed.expand(&inputs), expanded);
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.splitn(3, '\n');
    let name = lines.next().unwrap_or("");
    let template = lines.next().unwrap_or("");
    let format = lines.next().unwrap_or("");
    check_name(name);
    let size = data.len() as u64 * 977;
    written_name(name, size, size + name.len() as u64, format);
    check_template(template, name);
    check_format(format, name, data);
});
