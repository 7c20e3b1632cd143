//! Writes the seed corpus, `fuzz/seeds/<target>/`, from the exchanges the tests drive:
//! POP3, SASL, SMTP and LMTP sessions, PROXY headers, forwarding preambles, and what a
//! real `transfer::Sender` and `Framed` writer put on the replica link, and what a real
//! Dovecot 2.3 wrote for the import targets (password hashes, a `dovecot-uidlist`, Maildir
//! file names and messages, kept here as literals so the example needs no Dovecot). Run by
//! `scripts/fuzz.sh --seeds`; the output is committed, so CI starts from meaningful input.
//! Built like the targets (instrumented), so it links libFuzzer's runtime but keeps its
//! own `main`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use libfuzzer_sys as _;
use mailgate::auth::{make_credentials, HashParams};
use mailgate::cluster::frame::Framed;
use mailgate::cluster::transfer::{receive, Installed, Progress, Sender};
use mailgate::cluster::Preamble;
use mailgate::config::Listener;
use mailgate::migrate::frame;
use mailgate::store::{Account, Directory, StoreOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// A POP3 session as the tests' clients run it.
const POP3_SESSION: &str = "CAPA\r\nUSER alice@example.org\r\nPASS s3cret-password\r\nSTAT\r\n\
LIST\r\nLIST 1\r\nUIDL\r\nUIDL 1\r\nTOP 1 5\r\nRETR 1\r\nDELE 1\r\nLAST\r\nRSET\r\nNOOP\r\nQUIT\r\n";

/// An SMTP delivery with the extensions the server offers.
const SMTP_SESSION: &str = "EHLO client.example\r\nMAIL FROM:<sender@example.com> SIZE=120 \
BODY=8BITMIME\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n\
Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n";

const LMTP_SESSION: &str = "LHLO mta.example\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\n\
DATA\r\nFrom: a@example.com\r\n\r\nhello\r\n.\r\nQUIT\r\n";

const MESSAGE: &str = "From: a@example.com\r\nTo: alice@example.org\r\nSubject: test\r\n\r\n\
line one\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n";

/// `doveadm pw -s SCHEME -p pencil` (Dovecot 2.3.19.1, its default costs, and
/// `-r 1000` / `-r 4` for the cheap SHA512-CRYPT and BLF-CRYPT ones).
const DOVEADM_PW: [&str; 13] = [
    "{SHA512-CRYPT}$6$bSSx9YGOGnh9Vqcf$mnppJlclKw0OpRx8MrCH9uwC25NIeGWKehZslWv5RIrworP5HgMFTWWqUKK/GePc3jxsSBF.PPQ.ccc57h/FY/",
    "{SHA512-CRYPT}$6$rounds=1000$HooY0Gm6ZY9BwZjr$5dO2C8QnEmOPDx9jGFLYpHt2m2dxBNPGMNkGQJJXZ636kn.AGIhSbvoigDAkI1nJHFGvxL6TO9xJ4Xru.pVJS.",
    "{SHA256-CRYPT}$5$mcNUFA.xf9Mf2p/v$RyeFU63j9XgmWZhCJ5BN9PiCo71yI3b3eyXbylRVGf9",
    "{BLF-CRYPT}$2y$05$MSn8Gdj8Yzod2squ0/vdn.Opgc0kFD/2yfI7w2myOCepRRimf/pQO",
    "{BLF-CRYPT}$2y$04$ggJvOqJCfits8.uy.abua.3PuOI5CnW5A.O95GCPFdWx4qWqChlXq",
    "{CRYPT}$2y$05$uNpL.fLRtv/fxqwx2VaMMeBJXLCdh7X7oq7H/wL2lDWe6WM3Wnu26",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$UkkLYT8wlgQsTvfz7yEjhg$VOtIJKz+ZboeHEbVmQkkY46q0yEsS3ug52FvLNR1A0c",
    "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$lna2y8dLCjev3+9yJNq2Dw$kxMYrYRgu12mWXdxZuYQz34GF1JER1ret3DSb1fAlVE",
    "{MD5-CRYPT}$1$FOglOTIs$Xlex/FtwUf2Mw.ImYsKGS0",
    "{SSHA}PnmbSuykSSwcZ42JGAR7te9S58X70FjF",
    "{PLAIN}pencil",
    "{PLAIN.B64}cGVuY2ls",
    "{PLAIN.HEX}70656e63696c",
];

/// The `dovecot-uidlist` Dovecot 2.3 wrote for a Maildir that got four messages over LMTP
/// and lost the second by a POP3 DELE.
const DOVECOT_UIDLIST: &str = "3 V1796072630 N5 G58d0302eb6e40d6b1508000083ecc375\n\
1 :1796072630.M774951P2069.vm,S=277,W=288\n\
3 :1796072630.M810290P2069.vm,S=302,W=314\n\
4 :1796072630.M822289P2069.vm,S=280,W=291\n";

/// That Maildir's files in cur/, and the head of the third message as LMTP stored it.
const MAILDIR_NAMES: [&str; 3] = [
    "1796072630.M774951P2069.vm,S=277,W=288:2,",
    "1796072630.M810290P2069.vm,S=302,W=314:2,",
    "1796072630.M822289P2069.vm,S=280,W=291:2,",
];
const DOVECOT_HEAD: &str = "Return-Path: <a@example.com>\nDelivered-To: alice@example.org\n\
Received: from [127.0.0.1] ([127.0.0.1])\n\tby vm with LMTP\n\tid eC5eLbbkDWsVCAAAg+zDdQ:T3\n\
\t(envelope-from <a@example.com>)\n\tfor <alice@example.org>; Mon, 30 Nov 2026 21:03:50 +0000\n\
From: a@example.com\nSubject: m2\nX-UIDL: legacy-uidl-7\n\nbody 2\n";

fn main() {
    let root = PathBuf::from(std::env::args().nth(1).expect("usage: seeds CORPUS_DIR"));
    let mut seeds = Seeds { root };
    dovecot_seeds(&mut seeds);

    for (name, chunk) in [("pop3", 0xff), ("pop3-bytewise", 1), ("pop3-split", 7)] {
        seeds.put(
            "pop3_command",
            name,
            &[&[chunk], POP3_SESSION.as_bytes()].concat(),
        );
    }
    let pop3_more = [
        ("stls", "CAPA\r\nSTLS\r\n"),
        (
            "apop",
            "APOP alice@example.org c4c9334bac560ecc979e58001b3e22fb\r\nQUIT\r\n",
        ),
        (
            "auth-plain",
            "AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHMzY3JldA==\r\nQUIT\r\n",
        ),
        (
            "auth-list",
            "AUTH\r\nAUTH SCRAM-SHA-256\r\n*\r\nUTF8\r\nQUIT\r\n",
        ),
        (
            "bad",
            "FOO\r\nLIST x\r\nRETR 99999999999999999999\r\nUSER\r\n\r\n",
        ),
    ];
    for (name, text) in pop3_more {
        seeds.put("pop3_command", name, &[&[0xff], text.as_bytes()].concat());
    }

    for (name, first) in [("smtp", 0xfe_u8), ("smtp-split", 10), ("lmtp", 0xff)] {
        let session = if first & 1 == 1 {
            LMTP_SESSION
        } else {
            SMTP_SESSION
        };
        seeds.put(
            "smtp_command",
            name,
            &[&[first], session.as_bytes()].concat(),
        );
    }
    let smtp_more = [
        ("starttls", "EHLO a\r\nSTARTTLS\r\nEHLO a\r\nQUIT\r\n"),
        ("utf8", "EHLO a\r\nMAIL FROM:<j\u{f6}rg@example.com> SMTPUTF8\r\nRCPT TO:<\u{e9}@example.org>\r\n"),
        ("bad", "HELO\r\nMAIL FROM:bad\r\nRCPT TO:<>\r\nDATA\r\nVRFY x\r\n"),
    ];
    for (name, text) in smtp_more {
        seeds.put("smtp_command", name, &[&[0xfe], text.as_bytes()].concat());
    }

    let bodies: [(&str, &[u8]); 5] = [
        ("message", MESSAGE.as_bytes()),
        ("smuggling-lf", b"a\r\n\n.\r\nMAIL FROM:<x@y>\r\n"),
        ("smuggling-cr", b"a\r\n\r.\rb\r\n"),
        ("bare-lf-nul", b"line\n.\nnul\0here\n"),
        ("no-final-crlf", b"Subject: x\r\n\r\n."),
    ];
    for (name, body) in bodies {
        seeds.put("body_roundtrip", name, &[&[0x00], body].concat());
        seeds.put(
            "body_roundtrip",
            &format!("{name}-split"),
            &[&[0x52], body].concat(),
        );
    }

    let v2_tcp4 = [
        &b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c"[..],
        &[127, 0, 0, 1, 10, 0, 0, 2, 0xc3, 0x50, 0x00, 0x6e],
    ]
    .concat();
    let v2_tlv = [
        &b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x13"[..],
        &[192, 0, 2, 1, 198, 51, 100, 7, 0x30, 0x39, 0x03, 0xe3],
        &[0x04, 0x00, 0x04, b'a', b'b', b'c', b'd'],
    ]
    .concat();
    let v2_tcp6 = [
        &b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24"[..],
        &[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        &[0; 15],
        &[1, 0x30, 0x39, 0x00, 0x6e],
    ]
    .concat();
    let v2_local = &b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"[..];
    let proxies: [(&str, &[u8]); 7] = [
        (
            "v1-tcp4",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 12345 110\r\nCAPA\r\n",
        ),
        (
            "v1-tcp6",
            b"PROXY TCP6 2001:db8::1 2001:db8::2 12345 995\r\n",
        ),
        ("v1-unknown", b"PROXY UNKNOWN\r\n"),
        ("v2-tcp4", &v2_tcp4),
        ("v2-tlv", &v2_tlv),
        ("v2-tcp6", &v2_tcp6),
        ("v2-local", v2_local),
    ];
    for (name, header) in proxies {
        seeds.put("proxy_header", name, header);
    }

    let preambles = [
        Preamble {
            hop: 1,
            from: "replica-a".into(),
            client: "192.0.2.1:40000".parse().expect("address"),
            listener: Listener::Pop3s,
            tls: true,
            sid: 42,
            apop: Some("<1896.697170952@mail.example.com>".into()),
            helo: None,
        },
        Preamble {
            hop: 1,
            from: "b".into(),
            client: "[2001:db8::1]:25".parse().expect("address"),
            listener: Listener::Smtp,
            tls: false,
            sid: u64::MAX,
            apop: None,
            helo: Some("mta.example.com".into()),
        },
        Preamble {
            hop: 1,
            from: "c".into(),
            client: "127.0.0.1:1".parse().expect("address"),
            listener: Listener::Lmtp,
            tls: false,
            sid: 0,
            apop: None,
            helo: None,
        },
    ];
    for (i, preamble) in preambles.iter().enumerate() {
        let line = preamble.encode();
        seeds.put("preamble", &format!("line-{i}"), &line[..line.len() - 2]);
    }

    let plains: [(&str, &[u8]); 4] = [
        ("rfc4616", b"\0tim\0tanstaaftanstaaf"),
        ("authzid", b"Ursel\0Kurt\0xipj3plmq"),
        ("address", b"\0alice@example.org\0s3cret pass word"),
        ("utf8", "\0j\u{f6}rg\0p\u{e4}ss\u{2603}".as_bytes()),
    ];
    for (name, message) in plains {
        seeds.put("sasl_plain", name, message);
    }

    let scram_first = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    let lines = [
        (
            "auth-plain-ir",
            format!(
                "AUTH PLAIN {}\r\n",
                BASE64.encode(b"\0tim\0tanstaaftanstaaf")
            ),
        ),
        (
            "auth-plain-continued",
            format!(
                "AUTH PLAIN\r\n{}\r\n",
                BASE64.encode(b"\0alice@example.org\0pw")
            ),
        ),
        (
            "auth-scram",
            format!("AUTH SCRAM-SHA-256 {}\r\n", BASE64.encode(scram_first)),
        ),
        (
            "auth-scram-continued",
            format!(
                "auth scram-sha-256\r\n{}\r\n*\r\n",
                BASE64.encode(scram_first)
            ),
        ),
        ("auth-empty", "AUTH PLAIN =\r\n=\r\n".into()),
        ("auth-bad", "AUTH PLAIN !!\r\nYQ\r\nYR==\r\n".into()),
    ];
    for (name, text) in lines {
        seeds.put("sasl_line", name, &[&[0xff], text.as_bytes()].concat());
    }

    // The client-final stand-ins: \0C channel binding, \0N nonce, \0P the correct proof.
    let finals = [
        ("rfc7677", scram_first, "c=\0C,r=\0N,p=\0P"),
        ("y-flag", "y,,n=user,r=abc", "c=\0C,r=\0N,p=\0P"),
        ("authzid", "n,a=user,n=user,r=x+y/z", "c=\0C,r=\0N,p=\0P"),
        (
            "extension",
            "n,,n=alice@example.org,r=abc,x=ext",
            "c=\0C,r=\0N,x=yes,p=\0P",
        ),
        ("saslprep", "n,,n=I\u{ad}X=2C=3D,r=abc", "c=\0C,r=\0N,p=\0P"),
        (
            "wrong-proof",
            scram_first,
            "c=\0C,r=\0N,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        ),
        ("wrong-binding", scram_first, "c=biws,r=\0N,p=\0P"),
    ];
    for (name, first, last) in finals {
        seeds.put("scram", name, format!("{first}\n{last}").as_bytes());
    }

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let reply: &[u8] = b"+OK mailgate ready <1.2@mail.example.com>\r\n";
        let retr = [&b"+OK 120 octets\r\n"[..], MESSAGE.as_bytes(), b".\r\n"].concat();
        let mut link = Framed::new(Vec::new());
        link.write_all(reply).await.expect("memory");
        link.shutdown().await.expect("memory");
        let greeting = link.into_inner();
        seeds.put("link_frame", "greeting", &[&[0x00], &greeting[..]].concat());
        let mut link = Framed::new(greeting);
        link.next_session();
        link.write_all(&retr).await.expect("memory");
        link.shutdown().await.expect("memory");
        seeds.put(
            "link_frame",
            "two-sessions",
            &[&[0x13], &link.into_inner()[..]].concat(),
        );

        let (full, abandoned) = transfers().await;
        seeds.put("transfer_receive", "move", &full);
        seeds.put("transfer_receive", "abandoned", &abandoned);
    });
}

/// The import targets' seeds: Dovecot's own output, and what the import makes of it.
fn dovecot_seeds(seeds: &mut Seeds) {
    let mut passwd = String::from("# mailgate import test\n");
    for (i, field) in DOVEADM_PW.iter().enumerate() {
        passwd.push_str(&format!(
            "user{i}@example.org:{field}:1000:1000::/var/vmail/user{i}::\n"
        ));
    }
    seeds.put("dovecot_passwd", "doveadm-pw", passwd.as_bytes());
    for (i, field) in DOVEADM_PW.iter().enumerate() {
        seeds.put(
            "dovecot_passwd",
            &format!("field-{i}"),
            format!("alice:{field}").as_bytes(),
        );
    }
    // `{FUZZ-WRITE}` on lines 1 to 3: each of the target's three writers.
    for line in 1..=3 {
        let comments = "#\n".repeat(line - 1);
        let text = format!(
            "{comments}Bob@Example.org:{{FUZZ-WRITE}}p\u{e4}ss w\u{f6}rd:1000:1000:Bob:/home/bob::\n"
        );
        seeds.put("dovecot_passwd", &format!("write-{line}"), text.as_bytes());
    }
    seeds.put(
        "dovecot_passwd",
        "hostile",
        b"carol@other.org:{PLAIN}x\nbroken\n:{PLAIN}x\ndave:\n../x:{PLAIN}y\n\xff:{PLAIN}z\r\n\
a:b:c:d:e:f:g:h:i\nalice:{PLAIN}a\nALICE:{PLAIN}b\n",
    );

    seeds.put("dovecot_uidlist", "dovecot", DOVECOT_UIDLIST.as_bytes());
    // Dovecot's other version 3 records: W (virtual size), P (POP3 UIDL), G (GUID), O
    // (POP3 order); and lines appended after the header's N was written.
    let records = "3 V1796072630 N2 G58d0302eb6e40d6b1508000083ecc375\n\
1 W288 P000000016b0de4b6 :1796072630.M774951P2069.vm,S=277,W=288\n\
3 G2ee3d6106ce40d6b1a0800004d3ac52e :1796072630.M810290P2069.vm,S=302,W=314\n\
4 O2 Plegacy-uidl-7 :1796072630.M822289P2069.vm,S=280,W=291\n";
    seeds.put("dovecot_uidlist", "records", records.as_bytes());

    let layouts = [
        ("maildir:~/Maildir", "%08Xu%08Xv"),
        ("maildir:/var/vmail/%d/%n/Maildir:LAYOUT=fs", "%v.%u"),
        ("/srv/mail/%{domain}/%{username}", "%f"),
    ];
    for (i, (name, (template, format))) in MAILDIR_NAMES.iter().zip(layouts).enumerate() {
        let text = format!("{name}\n{template}\n{format}");
        seeds.put("maildir_name", &format!("dovecot-{i}"), text.as_bytes());
    }
    let more = [
        (
            "new",
            "1796072630.M822289P2069.vm,S=280,W=291\n/m/%u/~\n%08X{uid}%08X{uidvalidity}",
        ),
        (
            "trashed",
            "1796072630.M810290P2069.vm,S=302,W=314:2,ST\n~/mail\n%4f-%g",
        ),
        (
            "address",
            "alice@example.org\nmaildir:/var/vmail/%d/%n\n%5.4f%{guid}%%",
        ),
    ];
    for (name, text) in more {
        seeds.put("maildir_name", name, text.as_bytes());
    }

    let crlf = DOVECOT_HEAD.replace('\n', "\r\n");
    let lower = DOVECOT_HEAD.replace("X-UIDL:", "x-uidl:");
    let numbers = [1u8, 0, 0, 0, 0xb6, 0xe4, 0x0d, 0x6b, 0, 0, 0, 0];
    let heads: [(&str, Vec<u8>); 5] = [
        ("dovecot", DOVECOT_HEAD.into()),
        ("dovecot-crlf", crlf.into()),
        ("lower-case", lower.into()),
        (
            "numbers",
            [b"X-UIDL: 000000016b0de4b6\n\0".as_slice(), &numbers].concat(),
        ),
        ("uidl", b"000000016b0de4b6".to_vec()),
    ];
    for (name, head) in heads {
        seeds.put("x_uidl", name, &head);
    }

    let mails = [
        (288, "000000016b0de4b6"),
        (314, "legacy-uidl-7"),
        (0, "+OLD+"),
    ];
    for (i, (octets, uidl)) in mails.into_iter().enumerate() {
        let line = frame::header(octets, uidl);
        seeds.put(
            "import_frame",
            &format!("header-{i}"),
            &line[..line.len() - 1],
        );
    }
    let have = frame::have("000000016b0de4b6");
    seeds.put("import_frame", "have", &have[..have.len() - 1]);
    seeds.put("import_frame", "end", frame::END);
    seeds.put(
        "import_frame",
        "write",
        &[&291u64.to_le_bytes()[..], b"000000046b0de4b6"].concat(),
    );
}

struct Seeds {
    root: PathBuf,
}

impl Seeds {
    fn put(&mut self, target: &str, name: &str, data: &[u8]) {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        let mut file = std::fs::File::create(dir.join(name)).expect("seed file");
        file.write_all(data).expect("seed written");
    }
}

/// A stream that keeps a copy of what is written to it.
struct Tee<S> {
    inner: S,
    written: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tee<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tee<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            self.written
                .lock()
                .expect("not poisoned")
                .extend_from_slice(&data[..n]);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct Nobody;

impl Installed for Nobody {
    fn serving(&self, _: &str, _: u64) {}
}

/// What a real sender writes for a whole move (two passes, install, go) and for a pre-copy
/// it then abandons, each against a real receiver.
async fn transfers() -> (Vec<u8>, Vec<u8>) {
    let dirs = [tempdir(), tempdir()];
    let open = |d: &Path| Arc::new(Directory::open(d, StoreOptions::default()).expect("directory"));
    let (home, target) = (open(dirs[0].path()), open(dirs[1].path()));
    home.add_domain("fuzz.example").expect("domain");
    let store = home.domain("fuzz.example").expect("store");
    let credentials = make_credentials("s3cret", &HashParams::cheap()).expect("credentials");
    for (local, bodies) in [
        ("alice", &["one\r\n", "two\r\n"][..]),
        ("bob", &[MESSAGE][..]),
    ] {
        store
            .create_account(local, &Account::new(credentials.clone()))
            .expect("account");
        for body in bodies {
            let mut msg = store.begin_message(local).expect("message");
            msg.write(&store, body.as_bytes()).expect("body");
            msg.commit(&store).expect("commit");
        }
    }
    // Imported mail: a stored UIDL, and a deleted one that leaves a tombstone.
    for uidl in ["00000001abcdef01", "00000002abcdef01"] {
        let mut msg = store
            .begin_import("alice", uidl)
            .expect("import")
            .expect("new uidl");
        msg.write(&store, b"imported\r\n").expect("body");
        msg.commit(&store).expect("commit");
    }
    let deleted = store.snapshot("alice").expect("maildrop");
    let last = deleted.last().expect("imported message").id;
    store.update_maildrop("alice", &[last], &[]).expect("delete");
    let mut out = Vec::new();
    for finish in [true, false] {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let written = Arc::new(Mutex::new(Vec::new()));
        let tee = Tee {
            inner: near,
            written: written.clone(),
        };
        let t = target.clone();
        let receiver = tokio::spawn(async move { receive(far, t, "fuzz.example", &Nobody).await });
        let mut sender = Sender::start(tee).await.expect("receiver ready");
        let progress = Progress::default();
        sender
            .pass(&store, None, &progress)
            .await
            .expect("pre-copy");
        if finish {
            home.seal("fuzz.example").expect("seal");
            let floor = store.id_floor().expect("floor");
            sender
                .pass(&store, Some(floor), &progress)
                .await
                .expect("final pass");
            sender.install().await.expect("install");
            sender.go(7).await.expect("go");
            receiver.await.expect("receiver task").expect("received");
            target.remove_domain("fuzz.example").expect("clean target");
        } else {
            sender.abandon("operator cancelled").await;
            assert!(receiver.await.expect("receiver task").is_err());
        }
        out.push(std::mem::take(&mut *written.lock().expect("not poisoned")));
    }
    let abandoned = out.pop().expect("two runs");
    (out.pop().expect("two runs"), abandoned)
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}
