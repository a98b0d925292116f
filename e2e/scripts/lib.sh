# Shared helpers of the e2e scripts (sourced, not run).

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }

# Debian mirror URIs of this machine's own apt configuration (deb822 or one-line format), so no
# registry host is ever written into the repository.
debian_mirror_uris() {
  local uris=""
  if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
    uris=$(awk '
      /^Types:/ { deb = ($0 ~ /deb/) } 
      /^URIs:/ { for (i = 2; i <= NF; i++) u = u " " $i }
      /^Suites:/ { s = $0 }
      /^$/ { if (u != "" && s ~ /(bookworm|trixie|stable)( |$)/ && s !~ /security/) out = out u; u = ""; s = "" }
      END { if (u != "" && s ~ /(bookworm|trixie|stable)( |$)/ && s !~ /security/) out = out u; print out }
    ' /etc/apt/sources.list.d/*.sources)
  fi
  if [ -z "${uris// /}" ] && [ -f /etc/apt/sources.list ]; then
    uris=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' /etc/apt/sources.list | sort -u | tr '\n' ' ')
  fi
  echo "$uris" | xargs -n1 2>/dev/null | grep -v -- '-security' | sort -u | tr '\n' ' '
}

# The keyring the machine's Debian entry is signed with.
debian_keyring() {
  local k
  k=$(awk '/^Signed-By:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  echo "${k:-/usr/share/keyrings/debian-archive-keyring.gpg}"
}

apt_updated_marker=/var/lib/apt/periodic/memu-updated
apt_update_once() {
  # One `apt-get update` per hour at most keeps reruns fast.
  if [ ! -f "$apt_updated_marker" ] || [ -n "$(find "$apt_updated_marker" -mmin +60 2>/dev/null)" ]; then
    log "apt-get update"
    apt-get update -qq >&2
    mkdir -p "$(dirname "$apt_updated_marker")" && touch "$apt_updated_marker"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Version stamps of the tools the install scripts build into a bin directory:
# `have_tool BIN NAME VERSION` holds when BIN/NAME exists and was built at VERSION.
stamp_tool() { echo "$2 $3" > "$1/.$2.version"; }
have_tool() { [ -x "$1/$2" ] && [ "$(cat "$1/.$2.version" 2>/dev/null)" = "$2 $3" ]; }
