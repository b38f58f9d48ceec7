#!/usr/bin/env bash
# One front door for a training run on one host or many: picks the launcher, sizes threads,
# prints the exact command, then runs `python -m app.train OVERRIDES...` on every rank.
#
#   scripts/launch.sh -np 2 experiment=smoke                          # horovodrun --gloo, this host
#   scripts/launch.sh --launcher mpi -H node1:2,node2:2 model=llama_small
#   scripts/launch.sh --hostfile hosts.txt --network-interface eth0 train.max_steps=1000
#   scripts/launch.sh --elastic --min-np 1 --max-np 4 --hostfile hosts.txt --max-restarts 3 ...
#
# Options (everything after them, or after --, is a Hydra override):
#   --launcher gloo|mpi     horovodrun with Gloo (default) or OpenMPI's mpirun
#   -np N                   ranks (default: all slots of the hosts)
#   -H host:slots,...       hosts (default localhost:N); or
#   --hostfile FILE         lines "host slots=N", the format both launchers read
#   --network-interface IF  the NIC the ranks talk over (collectives and the launcher's own traffic);
#                           --elastic finds it when not given (app/network.py): the loopback one
#                           when every host is this machine, else by Horovod's probe over ssh
#   --dry-run               print the command and stop
# Elastic training (Gloo; app/elastic.py): ranks come and go with the hosts while the job runs.
#   --elastic               horovodrun --host-discovery-script scripts/discover_hosts.sh, which
#                           reads --hostfile (host:slots lines, edit it while the job runs) or,
#                           without one, the SLURM job's nodes; adds train.elastic=true
#   --min-np N              fewest ranks to train with (default 1); --max-np M: most (default: all)
#   --max-restarts K        if the job fails anyway, start it again from its last checkpoint, up
#                           to K times (default 0), as torchrun --max-restarts does
#   --blacklist-cooldown-range LO HI   seconds before a host whose rank failed is tried again
#                           (default: never); LO >= 1
# Environment: PYTHON (python), OMP_NUM_THREADS (default: this host's cores / its ranks),
#   NIC_PROBE_TIMEOUT_S (60): how long --elastic probes the hosts for --network-interface.
# Hosts are assumed alike: the same cores, paths and venv everywhere (what remote ranks get).
set -euo pipefail

die() { echo "launch.sh: $*" >&2; exit 2; }

launcher=gloo np="" hosts="" hostfile="" nic="" dry_run=0
elastic=0 min_np="" max_np="" max_restarts=0 cooldown=()
while (($#)); do
    case $1 in
        --launcher) [ $# -ge 2 ] || die "--launcher needs gloo or mpi"; launcher=$2; shift 2 ;;
        -np) [ $# -ge 2 ] || die "-np needs a number"; np=$2; shift 2 ;;
        -H | --hosts) [ $# -ge 2 ] || die "-H needs host:slots[,host:slots...]"; hosts=$2; shift 2 ;;
        --hostfile) [ $# -ge 2 ] || die "--hostfile needs a file"; hostfile=$2; shift 2 ;;
        --network-interface) [ $# -ge 2 ] || die "--network-interface needs a name"; nic=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --elastic) elastic=1; shift ;;
        --min-np) [ $# -ge 2 ] || die "--min-np needs a number"; min_np=$2; shift 2 ;;
        --max-np) [ $# -ge 2 ] || die "--max-np needs a number"; max_np=$2; shift 2 ;;
        --max-restarts) [ $# -ge 2 ] || die "--max-restarts needs a number"; max_restarts=$2; shift 2 ;;
        --blacklist-cooldown-range)
            [ $# -ge 3 ] || die "--blacklist-cooldown-range needs two numbers"; cooldown=("$2" "$3"); shift 3 ;;
        --) shift; break ;;
        -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) break ;;  # the first Hydra override
    esac
done

case $launcher in gloo | mpi) ;; *) die "--launcher must be gloo or mpi, not '$launcher'" ;; esac
[ -z "$np" ] || [[ $np =~ ^[1-9][0-9]*$ ]] || die "-np must be a positive integer, not '$np'"
[ -z "$hosts" ] || [ -z "$hostfile" ] || die "give -H or --hostfile, not both"
for value in "$min_np" "$max_np" "${cooldown[@]}"; do
    [ -z "$value" ] || [[ $value =~ ^[1-9][0-9]*$ ]] ||
        die "--min-np, --max-np and the cooldown take positive integers, not '$value'"
done
[[ $max_restarts =~ ^[0-9]+$ ]] || die "--max-restarts must be 0 or more, not '$max_restarts'"
if ((elastic)); then
    [ "$launcher" = gloo ] ||
        die "--elastic runs over Gloo (Horovod's elastic mode has no MPI); drop --launcher $launcher"
    [ -z "$hosts" ] || die "--elastic reads its hosts from --hostfile FILE (edited while the job runs), not -H"
    [ -n "$hostfile" ] || [ -n "${SLURM_JOB_NODELIST:-}" ] ||
        die "--elastic needs --hostfile FILE (or a SLURM job's nodes)"
    if [ -n "$hostfile" ]; then
        [ -r "$hostfile" ] || die "hostfile '$hostfile' not found"
        export ELASTIC_HOSTFILE; ELASTIC_HOSTFILE=$(cd "$(dirname "$hostfile")" && pwd)/$(basename "$hostfile")
    fi
    discover=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/discover_hosts.sh
    # The hosts now, in the format -H takes: they size the first world and the threads per rank.
    hosts=$("$discover" | paste -sd, -) || die "host discovery failed"
    [ -n "$hosts" ] || die "host discovery found no hosts"
    hostfile="" min_np=${min_np:-1}
elif [ -n "$min_np$max_np${cooldown[*]}" ] || ((max_restarts)); then
    die "--min-np, --max-np, --max-restarts and --blacklist-cooldown-range need --elastic"
fi

# Slots per host, in order: from -H, from the hostfile, or np ranks on this host.
if [ -n "$hostfile" ]; then
    [ -r "$hostfile" ] || die "hostfile '$hostfile' not found"
    # One number per host line: its slots=N, or 1 as both launchers assume.
    mapfile -t slots < <(awk '!/^[[:space:]]*(#|$)/ {
        n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=[0-9]+$/) n = substr($i, 7); print n }' "$hostfile")
    ((${#slots[@]})) || die "hostfile '$hostfile' names no hosts"
elif [ -n "$hosts" ]; then
    IFS=, read -ra entries <<<"$hosts"
    slots=()
    for entry in "${entries[@]}"; do
        [[ $entry =~ ^[^:,[:space:]]+:([1-9][0-9]*)$ ]] || die "-H entry '$entry' is not host:slots"
        slots+=("${BASH_REMATCH[1]}")
    done
else
    [ -n "$np" ] || die "give -np, -H or --hostfile"
    hosts=localhost:$np
    slots=("$np")
fi
total_slots=0
for n in "${slots[@]}"; do total_slots=$((total_slots + n)); done
np=${np:-$total_slots}
if ((elastic)); then
    np=$((np > ${max_np:-np} ? max_np : np))
    ((min_np <= ${max_np:-min_np})) || die "--min-np $min_np is more than --max-np $max_np"
    ((np >= min_np)) || die "$np ranks to start with, fewer than --min-np $min_np (the hosts have $total_slots slots)"
fi
((np <= total_slots)) || die "-np $np is more than the $total_slots slots of the hosts"

if ((elastic)) && [ -z "$nic" ]; then
    # Given no interface, horovodrun's elastic driver waits for two hosts before it probes them
    # (up to --elastic-timeout, 600 s, printing nothing): a job on this machine alone never
    # started. app/network.py answers instead, in bounded time (a name that never resolves too).
    probe_s=${NIC_PROBE_TIMEOUT_S:-60}
    [[ $probe_s =~ ^[1-9][0-9]*$ ]] || die "NIC_PROBE_TIMEOUT_S must be a positive integer, not '$probe_s'"
    IFS=, read -ra entries <<<"$hosts"
    probe_errors=$(mktemp)
    if ! nic=$(timeout -k 5 $((probe_s + 5)) "${PYTHON:-python}" -m app.network "$probe_s" "${entries[@]%:*}" \
        2>"$probe_errors"); then
        reason=$(sed -n 's/^app\.network: //p' "$probe_errors" | head -n 1)
        rm -f "$probe_errors"
        die "--elastic found no network interface for the hosts (${reason:-the probe over ssh failed or took \
over $probe_s s}); give --network-interface IF, the interface they reach each other through"
    fi
    rm -f "$probe_errors"
fi
if [ -n "$nic" ]; then
    # /proc/net/dev lists the interfaces of this process's network namespace.
    grep -q "^ *$nic:" /proc/net/dev || die "network interface '$nic' does not exist on this host"
fi

# Each rank gets an equal share of a host's cores for torch's intra-op threads (app/dist.py
# reads the same share); an OMP_NUM_THREADS set by the caller wins.
ranks_here=$((np < slots[0] ? np : slots[0]))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(($(nproc) / ranks_here > 0 ? $(nproc) / ranks_here : 1))}

placement=()
if [ -n "$hostfile" ]; then placement=(--hostfile "$hostfile"); else placement=(-H "$hosts"); fi

if ((elastic)); then
    # Workers that join later must find the run without asking the others: its name is fixed
    # here, once (a SLURM job's id does that job under SLURM), and kept across restarts.
    [ -n "${LLAMA_RUN_STAMP:-}" ] || [ -n "${SLURM_JOB_ID:-}" ] || export LLAMA_RUN_STAMP=$(date +%Y-%m-%d_%H-%M-%S)
    # After a reset the ranks wait this long in Gloo's rendezvous for a joining worker, whose
    # start-up (python, torch, transformers) took 30 s on a loaded 2-core host: Horovod's 30 s
    # default then aborts the whole job. It also bounds how long a hung (not dead) peer can
    # stall a collective; a dead one is noticed at once (its connections reset).
    export HOROVOD_GLOO_TIMEOUT_SECONDS=${HOROVOD_GLOO_TIMEOUT_SECONDS:-180}
    command=(horovodrun --gloo -np "$np" --min-np "$min_np" --host-discovery-script "$discover")
    [ -z "$max_np" ] || command+=(--max-np "$max_np")
    ((${#cooldown[@]} == 0)) || command+=(--blacklist-cooldown-range "${cooldown[@]}")
    [ -z "$nic" ] || command+=(--network-interface "$nic")
elif [ "$launcher" = gloo ]; then
    # horovodrun copies the whole environment to every rank, remote ones through ssh.
    # --network-interface reaches Gloo's collectives only with our patched Horovod build
    # (scripts/horovod-0.28.1.patch); stock 0.28.1 uses the address the host name resolves to.
    command=(horovodrun --gloo -np "$np" "${placement[@]}")
    [ -z "$nic" ] || command+=(--network-interface "$nic")
else
    # mpirun gives remote ranks only the variables named with -x: those that shape a run.
    # --bind-to none: OpenMPI binds each rank to one core by default for np <= 2, which
    # would leave torch one thread however many cores the rank was given.
    command=(mpirun -np "$np" "${placement[@]}" --bind-to none)
    passed='^(PATH|PYTHONPATH|LD_LIBRARY_PATH|VIRTUAL_ENV|OMP_.*|MKL_.*|HOROVOD_.*|NCCL_.*|CUDA_.*'
    passed+='|TORCH.*|PYTORCH_.*|HF_.*|TRANSFORMERS_.*|SLURM_JOB_ID|SLURM_ARRAY_.*)$'
    for name in $(compgen -e | grep -E "$passed"); do
        command+=(-x "$name")
    done
    # btl: the ranks' MPI traffic; oob: the daemons' control traffic. NCCL (GPU builds) likewise.
    [ -z "$nic" ] || command+=(--mca btl_tcp_if_include "$nic" --mca oob_tcp_if_include "$nic"
                               -x "NCCL_SOCKET_IFNAME=$nic")
fi
command+=("${PYTHON:-python}" -m app.train "$@")
((elastic == 0)) || command+=(train.elastic=true)

# Shell-quoted, so the line can be pasted back into a shell as it is.
echo "launch: OMP_NUM_THREADS=$OMP_NUM_THREADS$(printf ' %q' "${command[@]}")"
((dry_run)) && exit 0
((elastic)) || exec "${command[@]}"

# Elastic: ranks never wait on one another outside the loop (app/elastic.py), so the data is
# prepared here, once, before any rank starts; bad overrides fail here too, before any restart.
prepare=("${PYTHON:-python}" -m app.prepare)
for override in "$@"; do [[ $override == hydra.* ]] || prepare+=("$override"); done
"${prepare[@]}" || exit $?
for ((attempt = 0; ; attempt++)); do
    "${command[@]}" && exit 0
    status=$?
    ((attempt < max_restarts)) || { echo "launch: job failed (status $status), no restarts left" >&2; exit "$status"; }
    echo "launch: job failed (status $status); restart $((attempt + 1))/$max_restarts from its last checkpoint" >&2
done
