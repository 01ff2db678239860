#!/usr/bin/env bash
# Creates, or reopens, a throwaway SoftHSM2 token for development and tests.
#
# Everything lives in a project-local data dir, never in the system token dir
# (/var/lib/softhsm/tokens/), so no root is needed and `rm -rf "$DATA_DIR"` undoes it all.
#
#   DATA_DIR     where the config, token files and PIN files go (default .hsm-dev);
#                a relative path is taken relative to the current working directory
#   TOKEN_LABEL  label of the token (default hsmgw-dev); the gateway finds tokens by label
#
# Layout it creates:
#   $DATA_DIR/softhsm2.conf   from hsm-config/softhsm2.conf.template
#   $DATA_DIR/tokens/         SoftHSM2's token directory
#   $DATA_DIR/user.pin        user PIN, 32 hex chars, mode 0600, no trailing newline
#   $DATA_DIR/so.pin          security officer PIN, same format
#
# PINs are never printed; only the paths of the files that hold them.
set -euo pipefail

die() {
    printf 'dev-token: %s\n' "$*" >&2
    exit 1
}

command -v softhsm2-util >/dev/null 2>&1 \
    || die "softhsm2-util not found (Debian package softhsm2); run \`make deps\`"

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
template="$script_dir/softhsm2.conf.template"
[[ -f $template ]] || die "template not found: $template"

data_dir=${DATA_DIR:-.hsm-dev}
token_label=${TOKEN_LABEL:-hsmgw-dev}

[[ -n $token_label ]] || die "TOKEN_LABEL must not be empty"
# PKCS#11 token labels are 32 bytes, blank padded.
label_bytes=$(printf '%s' "$token_label" | wc -c)
(( label_bytes <= 32 )) || die "TOKEN_LABEL is longer than 32 bytes"

# SoftHSM2 resolves a relative tokendir against its own working directory, so the
# config gets an absolute path.
case $data_dir in
    /*) ;;
    *) data_dir="$PWD/$data_dir" ;;
esac
data_dir=${data_dir%/}
token_dir="$data_dir/tokens"
conf="$data_dir/softhsm2.conf"
user_pin_file="$data_dir/user.pin"
so_pin_file="$data_dir/so.pin"

# Everything created from here on is private to the current user.
umask 077

mkdir -p "$data_dir" "$token_dir"
chmod 0700 "$data_dir" "$token_dir"

# Rewrite the config only when it is missing or differs from the template's rendering.
template_text=$(<"$template")
# Quoted replacement: bash 5.2's patsub_replacement would otherwise expand '&' in the path.
rendered="${template_text//@TOKEN_DIR@/"$token_dir"}"
if [[ ! -f $conf ]] || [[ "$(<"$conf")" != "$rendered" ]]; then
    tmp=$(mktemp "$conf.XXXXXX")
    printf '%s\n' "$rendered" >"$tmp"
    mv -f "$tmp" "$conf"
fi

# 16 random bytes as 32 lowercase hex chars, no newline (the gateway reads the file verbatim).
new_pin_file() {
    local file=$1 tmp size
    [[ -e $file ]] && return 0
    tmp=$(mktemp "$file.XXXXXX")
    head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$tmp"
    size=$(wc -c <"$tmp")
    [[ $size -eq 32 ]] || { rm -f "$tmp"; die "could not generate a PIN for $file"; }
    mv -f "$tmp" "$file"
}
new_pin_file "$user_pin_file"
new_pin_file "$so_pin_file"

export SOFTHSM2_CONF="$conf"

# Listed separately so that a failing softhsm2-util (bad config, unreadable token dir)
# stops the script here instead of reading as "no such token".
slots=$(softhsm2-util --show-slots)

# Exact label match on the "Label:" lines of the token info (blank padding trimmed).
if LABEL="$token_label" awk '
        /^[[:space:]]*Label:/ {
            sub(/^[[:space:]]*Label:[[:space:]]*/, "")
            sub(/[[:space:]]+$/, "")
            if ($0 == ENVIRON["LABEL"]) found = 1
        }
        END { exit found ? 0 : 1 }' <<<"$slots"; then
    printf 'dev token %s already exists in %s\n' "$token_label" "$data_dir"
    exit 0
fi

# The PINs go on softhsm2-util's command line (it has no option to read them from a file),
# so they are visible to other local users in `ps` for as long as it runs. Acceptable only
# because this is a throwaway dev token with random PINs; never do this for a real HSM.
softhsm2-util --init-token --free --label "$token_label" \
    --so-pin "$(<"$so_pin_file")" --pin "$(<"$user_pin_file")"

printf 'SoftHSM2 config: %s\n' "$conf"
printf 'token label:     %s\n' "$token_label"
printf 'user PIN file:   %s\n' "$user_pin_file"
printf 'export SOFTHSM2_CONF=%s\n' "$conf"
