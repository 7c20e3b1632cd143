#!/usr/bin/env bash
# Makes a development CA and one server certificate per domain for mailgate.
# Never use these in production: the CA key sits next to the certificates.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: make-dev-certs.sh [-o DIR] DOMAIN...

Creates (or reuses) a development CA in DIR and, for each DOMAIN, an ECDSA P-256
certificate signed by it with SANs DOMAIN and mail.DOMAIN. The first domain's
certificate also covers localhost, 127.0.0.1 and ::1, so it can be the default.

  -o DIR   output directory (default: certs/dev next to this script, git-ignored)
  -h       this help

Files written to DIR:
  ca.crt, ca.key            the development CA (reused when both exist)
  DOMAIN.crt, DOMAIN.key    certificate chain (leaf only) and PKCS#8 key per domain
EOF
}

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out_dir="$script_dir/dev"

while getopts ':o:h' opt; do
    case "$opt" in
        o) out_dir=$OPTARG ;;
        h) usage; exit 0 ;;
        :) echo "make-dev-certs.sh: -$OPTARG needs an argument" >&2; usage >&2; exit 2 ;;
        *) echo "make-dev-certs.sh: unknown option -$OPTARG" >&2; usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))

if [[ $# -eq 0 ]]; then
    echo "make-dev-certs.sh: give at least one domain" >&2
    usage >&2
    exit 2
fi

if ! command -v openssl >/dev/null 2>&1; then
    echo "make-dev-certs.sh: the openssl command is required" >&2
    exit 1
fi

# Domain names end up in file names and in an openssl extension file: accept only
# plain LDH labels so nothing can escape the output directory or inject config.
label='[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?'
domains=()
for raw in "$@"; do
    domain=${raw,,}
    domain=${domain%.}
    if [[ ! $domain =~ ^$label(\.$label)+$ ]] || [[ ${#domain} -gt 253 ]]; then
        echo "make-dev-certs.sh: not a domain name: $raw" >&2
        exit 2
    fi
    domains+=("$domain")
done

# Keys are created private from the first byte; certificates are chmod-ed to 0644 below.
umask 077
mkdir -p "$out_dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

ca_crt="$out_dir/ca.crt"
ca_key="$out_dir/ca.key"
made=()

if [[ -f $ca_crt && -f $ca_key ]]; then
    ca_note="reused"
else
    openssl req -x509 -new -nodes \
        -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout "$ca_key" -out "$ca_crt" \
        -days 3650 -sha256 \
        -subj "/O=mailgate development/CN=mailgate development CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" 2>"$work/openssl.log" \
        || { cat "$work/openssl.log" >&2; exit 1; }
    ca_note="new"
fi
chmod 0600 "$ca_key"
chmod 0644 "$ca_crt"

first=1
for domain in "${domains[@]}"; do
    key="$out_dir/$domain.key"
    crt="$out_dir/$domain.crt"
    san="DNS:$domain,DNS:mail.$domain"
    if [[ $first -eq 1 ]]; then
        san="$san,DNS:localhost,IP:127.0.0.1,IP:::1"
        first=0
    fi
    cat >"$work/$domain.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
subjectAltName=$san
EOF
    rm -f "$key"
    openssl req -new -nodes \
        -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout "$key" -out "$work/$domain.csr" \
        -subj "/O=mailgate development/CN=$domain" 2>"$work/openssl.log" \
        || { cat "$work/openssl.log" >&2; exit 1; }
    # A random serial: reissuing for the same name must not repeat one.
    openssl x509 -req -in "$work/$domain.csr" \
        -CA "$ca_crt" -CAkey "$ca_key" -set_serial "0x$(openssl rand -hex 16)" \
        -days 825 -sha256 -extfile "$work/$domain.ext" \
        -out "$crt" 2>"$work/openssl.log" \
        || { cat "$work/openssl.log" >&2; exit 1; }
    chmod 0600 "$key"
    chmod 0644 "$crt"
    made+=("$crt ($san)" "$key")
done

echo "CA ($ca_note): $ca_crt"
echo "CA key:      $ca_key"
for line in "${made[@]}"; do
    echo "made:        $line"
done
cat <<EOF

Use in mailgate.toml:
  [tls]
  cert = "$out_dir/${domains[0]}.crt"
  key = "$out_dir/${domains[0]}.key"
EOF
for domain in "${domains[@]:1}"; do
    printf '  [tls.domains."%s"]\n  cert = "%s"\n  key = "%s"\n' \
        "$domain" "$out_dir/$domain.crt" "$out_dir/$domain.key"
done
cat <<EOF

Trust the CA in a client, for example:
  openssl s_client -connect 127.0.0.1:995 -servername mail.${domains[0]} -CAfile $ca_crt
  curl --cacert $ca_crt pop3s://mail.${domains[0]}/
EOF
