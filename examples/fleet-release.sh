#!/usr/bin/env bash
# An admin's CI release step for a fleet whose devices follow a channel
# (README: "4. A fleet: channels, waves, a watched rollout").
#
#   fleet-release.sh GROUP=SYSTEM...
#
# Pushes each SYSTEM's closure to the cache (signed with the cache key),
# writes the channel document (one group per argument, each with the same
# wave plan), signs it as devices will check it, publishes it (signature
# first) and, when PROMETHEUS is set, watches the rollout and publishes a
# signed halt if a wave fails too often.
# Exit: 0 published (and, when watched, rolled out everywhere), 3 halted,
# 4 still rolling out at DEADLINE, anything else an error (one line).
#
# Environment (keys are files: CI secrets, systemd credentials):
#   CACHE          where `nix copy` pushes: s3://bucket?region=…, https://…, file:///srv/cache
#   CACHE_KEY      the cache's secret key (nix-store --generate-binary-cache-key)
#   ADMIN_KEY      the deploy key (nixless keygen); devices trust its .pub
#   PUBLISH        where devices read the channel: s3://bucket/stable.json?region=…,
#                  https://… (PUT), or a path (published atomically)
#   CHANNEL        the channel's name                        (default: stable)
#   DEVICE_CACHES  JSON array of cache URLs devices read     (default: none; their own)
#   WAVES          JSON wave plan  (default: 1 % now, 10 % an hour later, all a day later)
#   ACTION         switch | boot                             (default: switch)
#   VALID_DAYS     days until the document expires          (default: 14)
#   SEQ            the document's sequence                   (default: now, Unix seconds)
#   PROMETHEUS     e.g. http://prometheus:9090: watch the rollout (default: don't)
#   MAX_FAILURE_RATE, MIN_HOSTS, DEADLINE                    (0.1, 1, 86400)
#   NIXLESS        the nixless binary                        (default: nixless on PATH)
set -euo pipefail

die() { echo "fleet-release: $*" >&2; exit 1; }
(($#)) || die "usage: fleet-release.sh GROUP=SYSTEM..."
: "${CACHE:?CACHE is required}" "${CACHE_KEY:?CACHE_KEY is required}"
: "${ADMIN_KEY:?ADMIN_KEY is required}" "${PUBLISH:?PUBLISH is required}"
channel=${CHANNEL:-stable}
nixless=${NIXLESS:-nixless}
waves=${WAVES:-'[{"percent": 1}, {"percent": 10, "soak_secs": 3600}, {"percent": 100, "soak_secs": 86400}]'}
action=${ACTION:-switch}
now=$(date +%s)
seq=${SEQ:-$now}
expires=$((now + ${VALID_DAYS:-14} * 86400))
caches=""
[[ -n ${DEVICE_CACHES:-} ]] && caches=", \"caches\": $DEVICE_CACHES"

# 1. Every closure into the cache, signed with the cache key. Devices
#    verify each narinfo against cache_keys and each NAR against it.
groups=""
for arg in "$@"; do
  group=${arg%%=*}
  system=${arg#*=}
  [[ $arg == *=* && $group =~ ^[A-Za-z0-9._-]{1,64}$ ]] || die "not GROUP=SYSTEM: $arg"
  [[ $system == /nix/store/* ]] || die "$group: not a store path: $system"
  case $CACHE in
    *\?*) to="$CACHE&secret-key=$CACHE_KEY" ;;
    *) to="$CACHE?secret-key=$CACHE_KEY" ;;
  esac
  [[ $to == *compression=* ]] || to="$to&compression=zstd"
  # (nix-command: still experimental in the Nix releases Debian ships)
  nix --extra-experimental-features nix-command copy --to "$to" "$system"
  groups+="${groups:+,}
    \"$group\": {\"system\": \"$system\", \"action\": \"$action\"$caches, \"waves\": $waves}"
done

# 2. The channel document. Its bytes are signed unchanged; `nixless sign`
#    refuses what a device would refuse (bad plan, expired, …).
doc=$(mktemp -d)/$channel.json
trap 'rm -rf "$(dirname "$doc")"' EXIT
cat >"$doc" <<JSON
{"channel": "$channel", "seq": $seq, "issued": $now, "expires": $expires, "halt": false,
  "groups": {$groups
  }}
JSON

# 3. Sign and publish: the signature goes first, then the document.
"$nixless" sign --key "$ADMIN_KEY" --publish "$PUBLISH" "$doc"

# 4. Watch the waves; halt (a signed seq + 1 with "halt": true) when one
#    fails too often. The exit code is the rollout's.
[[ -n ${PROMETHEUS:-} ]] || exit 0
exec "$nixless" rollout watch --prometheus "$PROMETHEUS" --channel-doc "$PUBLISH" \
  --key "$ADMIN_KEY" --publish "$PUBLISH" \
  --max-failure-rate "${MAX_FAILURE_RATE:-0.1}" --min-hosts "${MIN_HOSTS:-1}" --deadline "${DEADLINE:-86400}"
