//! A `dovecot-uidlist` file (`migrate::dovecot::parse_uidlist`). Properties: no panics;
//! a parsed list has a non-zero UIDVALIDITY, one entry per non-empty line after the
//! header, UIDs non-zero and strictly ascending, file names that cannot leave the Maildir
//! (non-empty, no `/` or NUL, not starting with `.`), and a next UID at least the header's
//! `N` and above every listed UID (unless the last is the largest UID); written back in
//! Dovecot's version 3 format it parses to the same list; the extensions a line carries
//! are its own (`P` and `G` as the last such field says). An error message stays short
//! whatever the input (a hostile version is cut, a line is named by its number).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::migrate::dovecot::{parse_uidlist, Uidlist};
use std::fmt::Write as _;

/// The list in the format Dovecot writes: the header, then `UID [P…] [G…] :name` lines.
fn write(list: &Uidlist) -> Vec<u8> {
    let mut out = format!("3 V{} N{}\n", list.uid_validity, list.next_uid);
    for entry in &list.entries {
        let _ = write!(out, "{}", entry.uid);
        if let Some(p) = &entry.pop3_uidl {
            let _ = write!(out, " P{p}");
        }
        if let Some(g) = &entry.guid {
            let _ = write!(out, " G{g}");
        }
        if let Some(o) = entry.pop3_order {
            let _ = write!(out, " O{o}");
        }
        let _ = writeln!(out, " :{}", entry.base);
    }
    out.into_bytes()
}

/// The last value of an extension `key` among a line's fields, as a plain reading gives.
fn extension(head: &str, key: char) -> Option<&str> {
    head.split(' ')
        .skip(1)
        .filter_map(|f| f.strip_prefix(key))
        .last()
}

fuzz_target!(|data: &[u8]| {
    let list = match parse_uidlist(data) {
        Ok(list) => list,
        Err(e) => {
            // At most 16 characters of a hostile version, each escaped in at most 10.
            assert!(e.to_string().len() < 300, "{e}");
            return;
        }
    };
    assert_ne!(list.uid_validity, 0);
    let header = data.split(|&b| b == b'\n').next().expect("a header");
    let header = std::str::from_utf8(header).expect("a parsed header is UTF-8");
    assert!(header.starts_with("3 ") || header == "3");
    let header_next = header
        .split(' ')
        .filter_map(|f| f.strip_prefix('N'))
        .next_back()
        .and_then(|n| n.parse::<u32>().ok())
        .expect("a parsed header has N");
    assert!(list.next_uid >= header_next);

    let lines: Vec<&[u8]> = data
        .split(|&b| b == b'\n')
        .skip(1)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), list.entries.len());
    let mut last = 0;
    for (entry, raw) in list.entries.iter().zip(&lines) {
        assert!(entry.uid > last, "UIDs ascend");
        last = entry.uid;
        assert!(!entry.base.is_empty() && !entry.base.starts_with('.'));
        assert!(!entry.base.contains(['/', '\0', '\n']));
        let text = std::str::from_utf8(raw).expect("a parsed line is UTF-8");
        let (head, base) = text.split_once(" :").expect("a parsed line has ` :`");
        assert_eq!(base, entry.base);
        assert_eq!(
            head.split(' ').next().and_then(|u| u.parse().ok()),
            Some(entry.uid)
        );
        assert_eq!(extension(head, 'P'), entry.pop3_uidl.as_deref());
        assert_eq!(extension(head, 'G'), entry.guid.as_deref());
        let order = extension(head, 'O')
            .filter(|o| o.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|o| o.parse::<u64>().ok());
        assert_eq!(order, entry.pop3_order);
    }
    if last != u32::MAX {
        assert!(list.next_uid > last);
    }

    let written = write(&list);
    match parse_uidlist(&written) {
        Ok(again) => assert_eq!(again, list),
        Err(e) => panic!("a parsed list written back is refused: {e}"),
    }
});
