#!/usr/bin/env bash
# One front door for a training run on one host or many: picks the launcher, sizes threads,
# prints the exact command, then runs `python -m app.train OVERRIDES...` on every rank.
#
#   scripts/launch.sh -np 2 experiment=smoke                          # horovodrun --gloo, this host
#   scripts/launch.sh --launcher mpi -H node1:2,node2:2 model=llama_small
#   scripts/launch.sh --hostfile hosts.txt --network-interface eth0 train.max_steps=1000
#
# Options (everything after them, or after --, is a Hydra override):
#   --launcher gloo|mpi     horovodrun with Gloo (default) or OpenMPI's mpirun
#   -np N                   ranks (default: all slots of the hosts)
#   -H host:slots,...       hosts (default localhost:N); or
#   --hostfile FILE         lines "host slots=N", the format both launchers read
#   --network-interface IF  the NIC the ranks talk over (collectives and the launcher's own traffic)
#   --dry-run               print the command and stop
# Environment: PYTHON (python), OMP_NUM_THREADS (default: this host's cores / its ranks).
# Hosts are assumed alike: the same cores, paths and venv everywhere (what remote ranks get).
set -euo pipefail

die() { echo "launch.sh: $*" >&2; exit 2; }

launcher=gloo np="" hosts="" hostfile="" nic="" dry_run=0
while (($#)); do
    case $1 in
        --launcher) [ $# -ge 2 ] || die "--launcher needs gloo or mpi"; launcher=$2; shift 2 ;;
        -np) [ $# -ge 2 ] || die "-np needs a number"; np=$2; shift 2 ;;
        -H | --hosts) [ $# -ge 2 ] || die "-H needs host:slots[,host:slots...]"; hosts=$2; shift 2 ;;
        --hostfile) [ $# -ge 2 ] || die "--hostfile needs a file"; hostfile=$2; shift 2 ;;
        --network-interface) [ $# -ge 2 ] || die "--network-interface needs a name"; nic=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; break ;;
        -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) break ;;  # the first Hydra override
    esac
done

case $launcher in gloo | mpi) ;; *) die "--launcher must be gloo or mpi, not '$launcher'" ;; esac
[ -z "$np" ] || [[ $np =~ ^[1-9][0-9]*$ ]] || die "-np must be a positive integer, not '$np'"
[ -z "$hosts" ] || [ -z "$hostfile" ] || die "give -H or --hostfile, not both"

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
((np <= total_slots)) || die "-np $np is more than the $total_slots slots of the hosts"

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

if [ "$launcher" = gloo ]; then
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

# Shell-quoted, so the line can be pasted back into a shell as it is.
echo "launch: OMP_NUM_THREADS=$OMP_NUM_THREADS$(printf ' %q' "${command[@]}")"
((dry_run)) || exec "${command[@]}"
