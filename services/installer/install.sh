#!/usr/bin/env bash
# Cachegate host install, served by the cluster's proxy at /scripts/install.sh:
#
#   curl -fsSL https://PROXY:3443/scripts/install.sh | sudo bash
#
# installs the version this cluster runs (@VERSION@): a virtual environment in
# /opt/cachegate (the package from the proxy, its dependencies from PyPI), the CLIs in
# /usr/local/bin, the systemd units, and the `cachegate` system user they run as.
# Running it again changes nothing; a newer cluster version upgrades in place.
#
# Environment (all optional):
#   CACHEGATE_ROOT=/tmp/root    install under this root instead of / (images, tests):
#                               no user is created and systemctl is not called
#   CACHEGATE_PYTHON=python3.11 the Python to build the environment with (3.11 or newer)
#   CACHEGATE_PIP_ARGS="..."    extra pip arguments (a mirror: --index-url URL)
#   CACHEGATE_WHEEL=FILE        install this wheel instead of downloading it (its SHA-256
#                               must still match the pin below)
set -euo pipefail

CACHEGATE_VERSION='@VERSION@'
WHEEL_NAME='@WHEEL_NAME@'
WHEEL_SHA256='@WHEEL_SHA256@'
BASE_URL='@BASE_URL@'
# The CA the downloads are checked against (the cluster's host CA, or empty for the
# system CAs when the proxy's web port has a publicly trusted certificate).
CA_PEM='@CA_PEM@'

ROOT="${CACHEGATE_ROOT:-/}"
ROOT="${ROOT%/}"
PREFIX=/opt/cachegate
VENV="$ROOT$PREFIX"
PYTHON="${CACHEGATE_PYTHON:-python3}"
read -r -a PIP_ARGS <<<"${CACHEGATE_PIP_ARGS:-}"
BIN_LINKS=(cachegate cgctl cgate cachegate-auth cachegate-discovery cachegate-dbproxy)
changed=0

say() { printf 'cachegate-install: %s\n' "$*"; }
die() { printf 'cachegate-install: ERROR: %s\n' "$*" >&2; exit 1; }

[ -n "$ROOT" ] || [ "$(id -u)" = 0 ] || die "run as root: curl -fsSL $BASE_URL/scripts/install.sh | sudo bash"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# --- Python 3.11+ with venv ------------------------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    die "$PYTHON 3.11 or newer is needed (set CACHEGATE_PYTHON to another one)"
fi
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    if [ -z "$ROOT" ] && command -v apt-get >/dev/null; then
        say "installing python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
    else
        die "$PYTHON has no venv module: install python3-venv (Debian, Ubuntu) or python3 (Fedora)"
    fi
fi

# --- the package, from the proxy ----------------------------------------------------------
marker="$VENV/.cachegate-wheel-sha256"
if [ -x "$VENV/bin/cachegate" ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$WHEEL_SHA256" ]; then
    say "cachegate $CACHEGATE_VERSION is installed in $PREFIX (unchanged)"
else
    wheel="$tmp/$WHEEL_NAME"
    if [ -n "${CACHEGATE_WHEEL:-}" ]; then
        cp "$CACHEGATE_WHEEL" "$wheel"
    else
        curl_args=(-fsSL --retry 3 -o "$wheel")
        if [ -n "$CA_PEM" ]; then
            printf '%s\n' "$CA_PEM" >"$tmp/ca.pem"
            curl_args+=(--cacert "$tmp/ca.pem")
        fi
        say "downloading $BASE_URL/scripts/$WHEEL_NAME"
        curl "${curl_args[@]}" "$BASE_URL/scripts/$WHEEL_NAME" || die "cannot download $BASE_URL/scripts/$WHEEL_NAME"
    fi
    got="$(sha256sum "$wheel" | cut -d' ' -f1)"
    [ "$got" = "$WHEEL_SHA256" ] || die "$WHEEL_NAME has SHA-256 $got, not $WHEEL_SHA256: refusing to install it"
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating the virtual environment $PREFIX"
        mkdir -p "$(dirname "$VENV")"
        "$PYTHON" -m venv "$VENV"
    fi
    say "installing cachegate $CACHEGATE_VERSION (dependencies from PyPI)"
    # The package itself (again, if the same version number was rebuilt), then what it needs.
    pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${PIP_ARGS[@]}")
    { "${pip[@]}" --no-deps --force-reinstall "$wheel" && "${pip[@]}" "$wheel"; } >"$tmp/pip.log" 2>&1 \
        || { cat "$tmp/pip.log" >&2; die "pip install failed"; }
    printf '%s\n' "$WHEEL_SHA256" >"$marker"
    changed=1
fi

# --- the CLIs on PATH ----------------------------------------------------------------------
mkdir -p "$ROOT/usr/local/bin"
for name in "${BIN_LINKS[@]}"; do
    link="$ROOT/usr/local/bin/$name"
    if [ "$(readlink "$link" 2>/dev/null || true)" != "$PREFIX/bin/$name" ]; then
        ln -sfn "$PREFIX/bin/$name" "$link"
        say "linked /usr/local/bin/$name"
        changed=1
    fi
done

# --- systemd units -------------------------------------------------------------------------
units_dir="$(PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" -I -c \
    'import services.installer as i; print(i.SYSTEMD_DIR)')"
mkdir -p "$ROOT/etc/systemd/system"
units_changed=0
for unit in "$units_dir"/*.service; do
    dest="$ROOT/etc/systemd/system/$(basename "$unit")"
    if ! cmp -s "$unit" "$dest"; then
        install -m 0644 "$unit" "$dest"
        say "installed /etc/systemd/system/$(basename "$unit")"
        units_changed=1
        changed=1
    fi
done

# --- the user the units run as ---------------------------------------------------------------
if [ -n "$ROOT" ]; then
    say "CACHEGATE_ROOT is set: not creating the cachegate user, not calling systemctl"
else
    if ! getent passwd cachegate >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/cachegate --no-create-home \
            --shell /usr/sbin/nologin cachegate
        say "created the system user cachegate"
        changed=1
    fi
    if [ "$units_changed" = 1 ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
fi

if [ "$changed" = 0 ]; then
    say "nothing to do: cachegate $CACHEGATE_VERSION is installed"
else
    say "cachegate $CACHEGATE_VERSION is installed. Next:"
fi
cat <<EOF
  sudo cachegate db configure create -o file --proxy=PROXY:3080 --token=/tmp/token \\
      --ca-pin=sha256:... --azure-redis-discovery=eastus      # writes /etc/cachegate.yaml (0600)
  sudo systemctl enable --now cachegate                       # or cachegate-discovery, cachegate-dbproxy
  systemctl status cachegate
  journalctl -fu cachegate
EOF
