#!/usr/bin/env bash
# Host discovery for an elastic job (horovodrun --host-discovery-script runs it every second):
# prints one "host:slots" line per host that may run ranks now.
#
#   ELASTIC_HOSTFILE=hosts.txt scripts/discover_hosts.sh   # the file's hosts, read at every call
#   scripts/discover_hosts.sh                              # inside a SLURM job: the job's nodes
#
# The file takes "host:slots", "host slots=N" or "host" (1 slot) lines; # starts a comment. Edit
# it while the job runs to add or remove hosts, atomically (write a copy, then mv it over the
# file): a half-written file would read as hosts removed. scripts/launch.sh --elastic sets
# ELASTIC_HOSTFILE. A missing file is an error, which horovodrun retries after the first call.
set -euo pipefail

if [ -n "${ELASTIC_HOSTFILE:-}" ]; then
    [ -r "$ELASTIC_HOSTFILE" ] || { echo "discover_hosts.sh: hostfile '$ELASTIC_HOSTFILE' not found" >&2; exit 2; }
    awk '{ sub(/#.*/, "") } NF {
        host = $1; n = 1
        if (split(host, part, ":") == 2) { host = part[1]; n = part[2] }
        for (i = 2; i <= NF; i++) if ($i ~ /^slots=[0-9]+$/) n = substr($i, 7)
        print host ":" n }' "$ELASTIC_HOSTFILE"
elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    # The job's nodes do not change, but discovery still lets a failed node's ranks be replaced
    # after its blacklist cooldown, and the job run on fewer nodes meanwhile.
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/:${SLURM_NTASKS_PER_NODE:-1}/"
else
    echo "discover_hosts.sh: set ELASTIC_HOSTFILE, or run inside a SLURM job" >&2
    exit 2
fi
