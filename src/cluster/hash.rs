//! Rendezvous (highest random weight) hashing of a domain over replica names: every
//! replica gets a weight per domain, the heaviest one that is up is the domain's target.
//! Adding a replica moves only the domains it now wins; removing one moves only its own.
//! Pure: std and `sha2` only — no tokio, no tracing, no sockets, files or clock.
//!
//! The weights decide where *new* domains are placed; a domain's stored home is the
//! record in Redis, so changing the weights never moves an existing domain. Any change
//! to [`weight`] bumps [`HASH_VERSION`] (and the prefix it hashes) and the golden
//! vectors below.

use sha2::{Digest, Sha256};

/// Bumped whenever weights change: every stored home stays where it is (routing follows
/// the Redis record), but new domains would be placed differently.
pub const HASH_VERSION: u32 = 1;

/// Separates these weights from any other SHA-256 use and names the version, so a new
/// weight function cannot collide with the old one by accident.
const PREFIX: &[u8] = b"mailgate-hrw-v1\0";

/// weight(domain, replica) = first 8 bytes, big-endian u64, of
/// SHA-256(b"mailgate-hrw-v1\0" || lowercase(domain) || b"\0" || replica).
///
/// The domain is lowercased ASCII-wise (DNS names are case-insensitive); the replica
/// name is taken as it is.
pub fn weight(domain: &str, replica: &str) -> u64 {
    weight_lowercase(&domain.to_ascii_lowercase(), replica)
}

/// [`weight`] of a domain already lowercased, so a ranking lowercases once.
fn weight_lowercase(domain: &str, replica: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(PREFIX)
        .chain_update(domain.as_bytes())
        .chain_update(b"\0")
        .chain_update(replica.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// All replicas ordered by descending weight for this domain; ties broken by name
/// ascending. Duplicates removed.
pub fn ranking<'a>(domain: &str, replicas: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let domain = domain.to_ascii_lowercase();
    let mut weighted: Vec<(u64, &'a str)> = replicas
        .into_iter()
        .map(|replica| (weight_lowercase(&domain, replica), replica))
        .collect();
    sort_by_weight(&mut weighted);
    weighted.into_iter().map(|(_, replica)| replica).collect()
}

/// Heaviest first, equal weights by name ascending, then duplicate names dropped (a
/// name always has the same weight, so its copies end up next to each other).
fn sort_by_weight(weighted: &mut Vec<(u64, &str)>) {
    weighted.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    weighted.dedup_by(|a, b| a.1 == b.1);
}

/// The first replica of [`ranking`] for which `up(name)` is true; `None` when none is up
/// or the list is empty.
pub fn target<'a>(
    domain: &str,
    replicas: impl IntoIterator<Item = &'a str>,
    up: impl Fn(&str) -> bool,
) -> Option<&'a str> {
    ranking(domain, replicas)
        .into_iter()
        .find(|replica| up(replica))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const THREE: [&str; 3] = ["mailgate-0", "mailgate-1", "mailgate-2"];
    const FOUR: [&str; 4] = ["mailgate-0", "mailgate-1", "mailgate-2", "mailgate-3"];

    /// Computed once outside this code, with Python's hashlib:
    /// `int.from_bytes(sha256(b"mailgate-hrw-v1\0" + d.lower().encode() + b"\0"
    /// + r.encode()).digest()[:8], "big")`. A change to the weights fails here.
    #[test]
    fn weights_match_the_golden_vectors() {
        let cases = [
            ("example.org", "mailgate-0", 0xd67b_2249_6a76_f62d),
            ("example.org", "mailgate-1", 0xf87e_eb4d_809a_cdbe),
            ("example.org", "mailgate-2", 0x0e36_9c5b_63d1_ef3f),
            ("example.com", "mailgate-2", 0xdb6b_e3b8_4243_2c4d),
            ("Example.ORG", "mailgate-0", 0xd67b_2249_6a76_f62d),
            ("mail.example.net", "mailgate-1", 0x3fc4_9fa2_1f55_b570),
            ("", "mailgate-0", 0xc66f_3377_ed5d_7778),
        ];
        for (domain, replica, expected) in cases {
            assert_eq!(weight(domain, replica), expected, "{domain} {replica}");
        }
        assert_eq!(HASH_VERSION, 1, "new weights need new golden vectors");
    }

    /// Rankings over three replicas, from the same Python computation.
    #[test]
    fn rankings_match_the_golden_vectors() {
        let cases = [
            ("example.org", ["mailgate-1", "mailgate-0", "mailgate-2"]),
            ("example.com", ["mailgate-1", "mailgate-2", "mailgate-0"]),
            ("shop.example", ["mailgate-0", "mailgate-1", "mailgate-2"]),
            ("b.test", ["mailgate-0", "mailgate-2", "mailgate-1"]),
            (
                "lists.example.org",
                ["mailgate-2", "mailgate-1", "mailgate-0"],
            ),
        ];
        for (domain, expected) in cases {
            assert_eq!(ranking(domain, THREE), expected, "{domain}");
        }
    }

    #[test]
    fn domains_are_case_insensitive_and_replicas_are_not() {
        assert_eq!(
            weight("Example.ORG", "mailgate-0"),
            weight("example.org", "mailgate-0")
        );
        assert_eq!(ranking("Example.ORG", THREE), ranking("example.org", THREE));
        assert_ne!(
            weight("example.org", "Mailgate-0"),
            weight("example.org", "mailgate-0")
        );
    }

    #[test]
    fn ranking_drops_duplicates_and_ignores_input_order() {
        let reversed = ["mailgate-2", "mailgate-1", "mailgate-0"];
        let doubled = [
            "mailgate-0",
            "mailgate-2",
            "mailgate-0",
            "mailgate-1",
            "mailgate-2",
        ];
        let expected = ranking("example.org", THREE);
        assert_eq!(ranking("example.org", reversed), expected);
        assert_eq!(ranking("example.org", doubled), expected);
        assert!(ranking("example.org", []).is_empty());
    }

    #[test]
    fn equal_weights_rank_by_name() {
        let mut weighted = vec![
            (5, "mailgate-2"),
            (9, "mailgate-9"),
            (5, "mailgate-0"),
            (5, "mailgate-1"),
            (5, "mailgate-0"),
            (1, "mailgate-3"),
        ];
        sort_by_weight(&mut weighted);
        assert_eq!(
            weighted,
            [
                (9, "mailgate-9"),
                (5, "mailgate-0"),
                (5, "mailgate-1"),
                (5, "mailgate-2"),
                (1, "mailgate-3"),
            ]
        );
    }

    #[test]
    fn target_skips_down_replicas_in_ranking_order() {
        // example.org ranks mailgate-1, mailgate-0, mailgate-2.
        assert_eq!(target("example.org", THREE, |_| true), Some("mailgate-1"));
        assert_eq!(
            target("example.org", THREE, |r| r != "mailgate-1"),
            Some("mailgate-0")
        );
        assert_eq!(
            target("example.org", THREE, |r| r == "mailgate-2"),
            Some("mailgate-2")
        );
        assert_eq!(target("example.org", THREE, |_| false), None);
        assert_eq!(target("example.org", [], |_| true), None);
    }

    fn names() -> Vec<String> {
        (0..10_000).map(|i| format!("d{i}.example")).collect()
    }

    fn targets<'a>(names: &[String], replicas: &[&'a str]) -> Vec<&'a str> {
        names
            .iter()
            .map(|d| target(d, replicas.iter().copied(), |_| true).expect("a replica"))
            .collect()
    }

    #[test]
    fn a_new_replica_takes_about_a_quarter_and_only_for_itself() {
        let names = names();
        let before = targets(&names, &THREE);
        let after = targets(&names, &FOUR);
        let mut moved = 0;
        for ((name, old), new) in names.iter().zip(&before).zip(&after) {
            if old != new {
                moved += 1;
                assert_eq!(*new, "mailgate-3", "{name} moved from {old} to {new}");
            }
        }
        assert!((2_000..=3_000).contains(&moved), "{moved} of 10000 moved");
    }

    #[test]
    fn removing_a_replica_moves_only_its_own_domains() {
        let names = names();
        let before = targets(&names, &FOUR);
        let after = targets(&names, &["mailgate-0", "mailgate-2", "mailgate-3"]);
        let mut moved = 0;
        for ((name, old), new) in names.iter().zip(&before).zip(&after) {
            if old != new {
                moved += 1;
                assert_eq!(*old, "mailgate-1", "{name} moved from {old} to {new}");
            } else {
                assert_ne!(*old, "mailgate-1", "{name} stayed on the removed replica");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn three_replicas_share_the_domains_evenly() {
        let names = names();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for t in targets(&names, &THREE) {
            *counts.entry(t).or_default() += 1;
        }
        assert_eq!(counts.len(), 3, "{counts:?}");
        for (replica, n) in counts {
            assert!((3_000..=3_700).contains(&n), "{replica} got {n} of 10000");
        }
    }
}
