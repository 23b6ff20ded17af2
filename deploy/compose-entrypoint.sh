#!/usr/bin/env bash
# Entry point of the fleetlora services in docker-compose.yml. It wraps each service's command with the
# enrolment handshake that an operator and a device integrator do by hand elsewhere (docs/operator.md,
# docs/device.md), over two shared volumes:
#
#   $FLEETLORA_PUBLIC (/public)  the coordinator copies its ca.crt, coordinator-hpke.pub and
#                                coordinator-signing.pub here; devices mount it read-only.
#   $FLEETLORA_ENROLL (/enroll)  each device drops device-signing.pub and supernode-auth.pub in
#                                <device-id>/; the coordinator registers them and answers with a file
#                                `enrolled` there holding the sha256 of the auth key it registered.
#
# The command decides the role:
#
#   fleetlora coordinator up --config F   runs it in the background; once the SuperLink answers on
#       /health (keys, certificates and schema made), publishes the three files, then every few seconds
#       enrols each device in the enroll volume that it has not enrolled with those keys yet
#       (`fleetlora coordinator devices enroll --auth-key ...`, which needs the running SuperLink).
#       Its record of what it enrolled is kept in the state folder (STATE/enrolled/<device-id>), so a
#       coordinator with fresh state enrols every device again. It exits when the SuperLink host does.
#   fleetlora device up --config F        makes the device's keys once (`fleetlora device enroll`),
#       drops their public halves in the enroll volume, waits until the coordinator has enrolled these
#       very keys and the coordinator's files are there, then becomes the command.
#   anything else                          runs unchanged (`fleetlora simulate`, a shell, ...).
#
# Every path comes from the config file through fleetlora's own loader, so none can disagree with it.
# Trust: whatever can write to the enroll volume can enrol a device. In docker-compose.yml only the
# coordinator and the devices mount it; a real fleet hands .pub files over a channel the operator trusts.
set -euo pipefail

PUBLIC=${FLEETLORA_PUBLIC:-/public}
ENROLL=${FLEETLORA_ENROLL:-/enroll}
POLL=${FLEETLORA_POLL_SECONDS:-2}

log() { echo "compose-entrypoint: $*" >&2; }

config_arg() { # the FILE of `--config FILE` among the arguments
  while [ $# -gt 0 ]; do
    case $1 in
      --config) echo "${2:?--config needs a file}"; return ;;
      --config=*) echo "${1#--config=}"; return ;;
    esac
    shift
  done
  log "the command names no --config FILE"
  exit 2
}

setting() { # setting FILE device.state_dir: that setting of FILE, as fleetlora reads it
  python -c 'import functools, sys; from pathlib import Path
from fleetlora.common.host_config import load_host_config
print(functools.reduce(getattr, sys.argv[2].split("."), load_host_config(Path(sys.argv[1]))))' "$1" "$2"
}

sha256() { sha256sum <"$1" | cut -d' ' -f1; }

put() { # put SOURCE TARGET: copy by an atomic rename, so that a reader never sees half a file
  cp "$1" "$(dirname "$2")/.$(basename "$2").tmp"
  chmod 0644 "$(dirname "$2")/.$(basename "$2").tmp"
  mv -f "$(dirname "$2")/.$(basename "$2").tmp" "$2"
}

superlink_answers() { # superlink_answers CA_CERT URL: true once the SuperLink's /health says 200
  python -c 'import ssl, sys, urllib.request
urllib.request.urlopen(sys.argv[2], context=ssl.create_default_context(cafile=sys.argv[1]), timeout=5)' \
    "$1" "$2" 2>/dev/null
}

enrol_waiting() { # enrol_waiting CONFIG RECORD_DIR: register each device whose keys are new here
  local config=$1 record=$2 dir id digest
  for dir in "$ENROLL"/*/; do
    [ -d "$dir" ] || continue # the glob matched nothing
    id=$(basename "$dir")
    [ -f "$dir/device-signing.pub" ] && [ -f "$dir/supernode-auth.pub" ] || continue
    digest=$(sha256 "$dir/supernode-auth.pub")
    if [ "$(cat "$record/$id" 2>/dev/null)" != "$digest" ]; then
      if fleetlora coordinator devices enroll --device-id "$id" --public-key "$dir/device-signing.pub" \
        --auth-key "$dir/supernode-auth.pub" --config "$config"; then
        echo "$digest" >"$record/$id"
      else
        log "could not enrol $id yet; trying again"
        continue
      fi
    fi
    if [ "$(cat "$dir/enrolled" 2>/dev/null)" != "$digest" ]; then
      echo "$digest" >"$dir/.enrolled.tmp"
      mv -f "$dir/.enrolled.tmp" "$dir/enrolled"
    fi
  done
}

coordinator() {
  local config state keys certs address pid status
  config=$(config_arg "$@")
  state=$(setting "$config" coordinator.state_dir)
  keys=$(setting "$config" coordinator.keys_dir)
  certs=$(setting "$config" coordinator.certs_dir)
  address=$(setting "$config" coordinator.address)
  "$@" &
  pid=$!
  trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT
  until superlink_answers "$certs/ca.crt" "https://$address/health"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      status=0
      wait "$pid" || status=$?
      log "the coordinator exited (status $status) before its SuperLink answered"
      exit $((status == 0 ? 1 : status))
    fi
    sleep "$POLL"
  done
  for file in "$certs/ca.crt" "$keys/coordinator-hpke.pub" "$keys/coordinator-signing.pub"; do
    put "$file" "$PUBLIC/$(basename "$file")"
  done
  log "published ca.crt and the coordinator's public keys in $PUBLIC; enrolling devices from $ENROLL"
  mkdir -p "$state/enrolled"
  while kill -0 "$pid" 2>/dev/null; do
    enrol_waiting "$config" "$state/enrolled"
    sleep "$POLL" &
    wait $! || true # returns at once when a signal arrives
  done
  status=0
  wait "$pid" || status=$?
  exit "$status"
}

device() {
  local config state id ca keys digest drop waited=0
  config=$(config_arg "$@")
  state=$(setting "$config" device.state_dir)
  id=$(setting "$config" device.device_id)
  ca=$(setting "$config" device.ca_cert)
  keys=$(setting "$config" device.coordinator_keys)
  fleetlora device enroll --state-dir "$state" --device-id "$id" >/dev/null # makes keys only once
  drop="$ENROLL/$id"
  mkdir -p "$drop"
  put "$state/device-signing.pub" "$drop/device-signing.pub"
  put "$state/supernode-auth.pub" "$drop/supernode-auth.pub"
  digest=$(sha256 "$state/supernode-auth.pub")
  log "$id: public keys in $drop; waiting for the coordinator to enrol them"
  until [ "$(cat "$drop/enrolled" 2>/dev/null)" = "$digest" ] && [ -f "$ca" ] \
    && [ -f "$keys/coordinator-hpke.pub" ] && [ -f "$keys/coordinator-signing.pub" ]; do
    sleep "$POLL"
    waited=$((waited + POLL))
    if [ $((waited % 30)) -lt "$POLL" ]; then
      log "$id: still waiting after ${waited} s for the coordinator (its enrolled marker, $ca, $keys)"
    fi
  done
  log "$id: enrolled; starting: $*"
  exec "$@"
}

[ $# -gt 0 ] || set -- fleetlora --help
case "${1:-} ${2:-} ${3:-}" in
  "fleetlora coordinator up") coordinator "$@" ;;
  "fleetlora device up") device "$@" ;;
  *) exec "$@" ;;
esac
