#!/usr/bin/env bash
# Two "hosts" on this machine, for multi-host runs without a second machine: Linux network
# namespaces with their own hostnames (UTS namespaces) and sshd, joined by two veth links
#
#   host a (10.77.0.1, 10.78.0.1)  --lh0: 10.77.0.0/24--  host b (10.77.0.2, 10.78.0.2)
#                                  --lh1: 10.78.0.0/24--
#
# so a run can be told which link to use and be seen to use it. The hosts share this machine's
# filesystem, so paths and the venv are the same on both, as on a cluster with a shared home.
#
#   scripts/netns_hosts.sh up              # apt-get installs openssh-server if missing
#   scripts/netns_hosts.sh exec a CMD...   # run CMD on host a (its network and hostname)
#   scripts/netns_hosts.sh down            # whatever state `up` got to
#
# Keys, configs and logs live in $NETNS_DIR (default /tmp/llama-horovod-netns).
# Launchers reach host b with ssh: put $NETNS_DIR/bin first in PATH (`up` prints the line). Its `ssh` uses a key and
# config generated in $NETNS_DIR, so ~/.ssh is never read or written. Each host resolves the two
# hostnames through /etc/netns/<namespace>/hosts, which `ip netns exec` mounts over /etc/hosts
# for that namespace only (Horovod's Gloo binds to the address its hostname resolves to).
# Knob: NETNS_PREFIX (lh): namespace and hostname prefix, so two sets can coexist.
set -euo pipefail
# shellcheck source=scripts/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

die() { echo "netns_hosts.sh: $*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: [NETNS_DIR=DIR] $0 up|down|exec a|b CMD..."
NETNS_DIR=${NETNS_DIR:-/tmp/llama-horovod-netns}
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, sshd)"
DIR=$(mkdir -p "$NETNS_DIR" && cd "$NETNS_DIR" && pwd)
PREFIX=${NETNS_PREFIX:-lh}
HOSTS=(a b)
declare -A OCTET=([a]=1 [b]=2)

install_packages() {
    apt_install_missing netns_hosts openssh-server openssh-client
}

write_ssh_files() {
    [ -f "$DIR/id_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -C netns-client -f "$DIR/id_ed25519"
    [ -f "$DIR/host_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -C netns-host -f "$DIR/host_ed25519"
    cp "$DIR/id_ed25519.pub" "$DIR/authorized_keys"
    # Every host key is new and the hosts come and go: no known_hosts, no prompts.
    cat >"$DIR/ssh_config" <<EOF
Host *
    User root
    IdentityFile $DIR/id_ed25519
    IdentitiesOnly yes
    BatchMode yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
EOF
    mkdir -p "$DIR/bin"
    printf '#!/bin/sh\n# ssh with the netns hosts'"'"' key and config (scripts/netns_hosts.sh)\nexec /usr/bin/ssh -F %q "$@"\n' \
        "$DIR/ssh_config" >"$DIR/bin/ssh"
    chmod +x "$DIR/bin/ssh"
    for host in "${HOSTS[@]}"; do
        # StrictModes off: the key files live in a temp dir, not under a home directory.
        cat >"$DIR/sshd_config_$host" <<EOF
ListenAddress 10.77.0.${OCTET[$host]}
HostKey $DIR/host_ed25519
PidFile $DIR/sshd_$host.pid
AuthorizedKeysFile $DIR/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
MaxStartups 64
EOF
    done
}

make_links() {
    for host in "${HOSTS[@]}"; do
        ip netns add "$PREFIX-$host"
        ip -n "$PREFIX-$host" link set lo up
    done
    for link in 0 1; do
        # Named per namespace once moved, so both hosts call the link lh0 (or lh1), as the
        # launchers' interface options need.
        ip link add "$PREFIX-a$link" type veth peer name "$PREFIX-b$link"
        for host in "${HOSTS[@]}"; do
            ip link set "$PREFIX-$host$link" netns "$PREFIX-$host"
            ip -n "$PREFIX-$host" link set "$PREFIX-$host$link" name "lh$link"
            ip -n "$PREFIX-$host" addr add "10.7$((7 + link)).0.${OCTET[$host]}/24" dev "lh$link"
            ip -n "$PREFIX-$host" link set "lh$link" up
        done
    done
}

write_hosts_files() {
    for host in "${HOSTS[@]}"; do
        mkdir -p "/etc/netns/$PREFIX-$host"
        printf '127.0.0.1 localhost\n10.77.0.1 %s-a\n10.77.0.2 %s-b\n' "$PREFIX" "$PREFIX" >"/etc/netns/$PREFIX-$host/hosts"
    done
}

start_sshd() {
    mkdir -p /run/sshd  # sshd's privilege-separation directory
    for host in "${HOSTS[@]}"; do
        # ip netns exec: the host's network and its /etc/hosts; unshare --uts: its hostname.
        # Every session sshd starts (the remote ranks) inherits all three.
        ip netns exec "$PREFIX-$host" unshare --uts \
            sh -c "hostname $PREFIX-$host && exec /usr/sbin/sshd -f '$DIR/sshd_config_$host' -E '$DIR/sshd_$host.log'"
    done
    for host in "${HOSTS[@]}"; do
        for _ in $(seq 50); do [ -s "$DIR/sshd_$host.pid" ] && break; sleep 0.1; done
        [ -s "$DIR/sshd_$host.pid" ] || { cat "$DIR/sshd_$host.log" >&2; die "sshd on host $host did not start"; }
    done
}

in_host() {  # in_host a|b CMD...: CMD in the namespaces of the host's sshd, in this directory
    local host=$1
    shift
    [ -s "$DIR/sshd_$host.pid" ] || die "host $host is not up (run: $0 up)"
    nsenter --target "$(cat "$DIR/sshd_$host.pid")" --net --uts --mount --wd="$PWD" -- "$@"
}

check_ssh() {
    local seen
    seen=$(in_host a "$DIR/bin/ssh" 10.77.0.2 hostname) || die "ssh from host a to host b failed (see $DIR/sshd_b.log)"
    [ "$seen" = "$PREFIX-b" ] || die "ssh to 10.77.0.2 reached '$seen', not $PREFIX-b"
}

up() {
    [ ! -e "/run/netns/$PREFIX-a" ] || die "namespace $PREFIX-a exists already (run: $0 down)"
    # Any failure from here on takes down what was made so far.
    trap 'down >/dev/null 2>&1' EXIT
    install_packages
    write_ssh_files
    make_links
    write_hosts_files
    start_sshd
    check_ssh
    trap - EXIT
    echo "[netns_hosts] up: hosts $PREFIX-a (10.77.0.1) and $PREFIX-b (10.77.0.2); export PATH=$DIR/bin:\$PATH"
}

down() {
    for host in "${HOSTS[@]}"; do
        if [ -s "$DIR/sshd_$host.pid" ]; then
            kill "$(cat "$DIR/sshd_$host.pid")" 2>/dev/null || true
            rm -f "$DIR/sshd_$host.pid"
        fi
        # Deleting a namespace deletes the veth ends in it, and with them their peers.
        [ ! -e "/run/netns/$PREFIX-$host" ] || ip netns del "$PREFIX-$host"
        rm -rf "/etc/netns/$PREFIX-$host"
    done
    rmdir /etc/netns 2>/dev/null || true  # only if no other namespace uses it
    echo "[netns_hosts] down"
}

case $1 in
    up) up ;;
    down) down ;;
    exec)
        [ $# -ge 3 ] && [[ $2 == a || $2 == b ]] || die "usage: $0 exec a|b CMD..."
        host=$2
        shift 2
        in_host "$host" "$@" ;;
    *) die "unknown command '$1' (up|down|exec)" ;;
esac
