# Helpers shared by bench/pull.sh and bench/pull/build-image.sh. Sourced, not run.

log() { printf '[pull-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Installs the Debian packages named as arguments that are not installed yet.
ensure_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# The Debian mirror this machine's apt uses for bookworm (not the security archive), from
# /etc/apt/sources.list and /etc/apt/sources.list.d/*.{list,sources}.
debian_mirror() {
  local f uri=""
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { u = $i; s = $(i+1); break }
                            if (s == "bookworm" && u !~ /security/) { print u; exit } }' "$f")
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ]; then
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      # deb822: paragraphs separated by blank lines; take the first whose Suites has bookworm.
      uri=$(awk 'BEGIN { RS = ""; FS = "\n" }
                 { u = ""; s = ""; t = ""
                   for (i = 1; i <= NF; i++) {
                     if ($i ~ /^URIs:/)   { u = $i; sub(/^URIs:[ \t]*/, "", u); sub(/[ \t].*/, "", u) }
                     if ($i ~ /^Suites:/) { s = $i }
                     if ($i ~ /^Types:/)  { t = $i }
                   }
                   if (t ~ /deb([ \t]|$)/ && s ~ /[ \t]bookworm([ \t]|$)/ && u !~ /security/) { print u; exit } }' "$f")
      [ -n "$uri" ] && break
    done
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

# Seconds since the epoch with nanoseconds, for timing.
now() { date +%s.%N; }
# elapsed START END -> seconds with 2 decimals
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

drop_caches() {
  sync
  if [ "$(id -u)" -eq 0 ] && [ -w /proc/sys/vm/drop_caches ]; then
    echo 3 >/proc/sys/vm/drop_caches
  fi
}
