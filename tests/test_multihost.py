"""Two ranks on two hosts, for real: Linux network namespaces with their own hostname, sshd and
two links between them (scripts/netns_hosts.sh), the job started on host a by scripts/launch.sh
with horovodrun (Gloo) or mpirun, rank 1 reaching host b over ssh."""
import json
import shlex
import subprocess

import pytest

from conftest import ROOT, job_env, read_summary, tiny_train_args

HOSTS_SCRIPT = ROOT / "scripts" / "netns_hosts.sh"
PREFIX = "lht"  # namespaces lht-a and lht-b, apart from a set made by hand (lh-a, lh-b)
HOSTS = "10.77.0.1:1,10.77.0.2:1"
STEPS = 6  # tiny_train_args' max_steps
QUIET_LINK_BYTES = 64 * 1024  # handshakes and ssh only, far below one gradient allreduce


class Hosts:
    def __init__(self, state_dir):
        self.env = {**job_env(), "NETNS_DIR": str(state_dir), "NETNS_PREFIX": PREFIX}
        # The launchers find ssh on PATH: this one carries the generated key and config.
        self.env["PATH"] = f"{state_dir}/bin:{self.env['PATH']}"

    def script(self, *args, timeout=300):
        return subprocess.run([str(HOSTS_SCRIPT), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def link_bytes(self) -> dict:
        """Bytes received plus sent on host a's end of each link."""
        moved = {}
        for link in ("lh0", "lh1"):
            shown = subprocess.run(["ip", "-n", f"{PREFIX}-a", "-j", "-s", "link", "show", "dev", link],
                                   capture_output=True, text=True, check=True)
            stats = json.loads(shown.stdout)[0]["stats64"]
            moved[link] = stats["rx"]["bytes"] + stats["tx"]["bytes"]
        return moved

    def train(self, launcher: str, nic: str, data_dir, run_dir):
        """Train on both hosts; return the launch output and the bytes each link carried."""
        before = self.link_bytes()
        result = self.script("exec", "a", "scripts/launch.sh", "--launcher", launcher, "-H", HOSTS,
                             "--network-interface", nic, *tiny_train_args(data_dir, run_dir))
        assert result.returncode == 0, (f"launch exited {result.returncode}\n"
                                        f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
        after = self.link_bytes()
        return result.stdout, {link: after[link] - before[link] for link in after}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, request):
    """Hosts a and b for this module's tests; taken down afterwards whatever happened, even
    after an `up` that failed half-way. A set that cannot come up fails the tests."""
    hosts = Hosts(tmp_path_factory.mktemp("netns_hosts"))

    def take_down():
        down = hosts.script("down")
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert down.returncode == 0 and f"{PREFIX}-" not in left, f"{down.stderr}\nnamespaces left: {left}"

    request.addfinalizer(take_down)
    up = hosts.script("up", timeout=600)
    if up.returncode != 0:
        pytest.fail(f"scripts/netns_hosts.sh up exited {up.returncode}\n{up.stdout}\n{up.stderr}")
    return hosts


def assert_one_rank_per_host(run_dir, controller: str):
    summary = read_summary(run_dir)
    assert (summary["step"], summary["world_size"], summary["controller"]) == (STEPS, 2, controller)
    assert [(r["rank"], r["host"]) for r in summary["replicas"]] == [(0, f"{PREFIX}-a"), (1, f"{PREFIX}-b")]
    assert summary["replicas_identical"] is True


def gradient_bytes(run_dir) -> int:
    """What one allreduce of all gradients moves per rank and direction, about: the fp32 weights."""
    return (run_dir / "checkpoints" / f"step-{STEPS:06d}" / "model-rank00000.safetensors").stat().st_size


def test_horovodrun_gloo_puts_one_rank_on_each_host_over_the_chosen_link(hosts, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    output, moved = hosts.train("gloo", "lh0", tiny_data, run_dir)
    assert "horovodrun --gloo -np 2 -H" in output and "--network-interface lh0" in output
    assert_one_rank_per_host(run_dir, "gloo")
    assert moved["lh0"] > STEPS * gradient_bytes(run_dir), moved
    assert moved["lh1"] < QUIET_LINK_BYTES, moved


def test_mpirun_puts_one_rank_on_each_host_over_the_chosen_link(hosts, tiny_data, tmp_path):
    # lh1 on purpose: ssh (mpirun's way to host b) goes over lh0, so only the MCA options can
    # move the ranks' and daemons' traffic to lh1.
    run_dir = tmp_path / "run"
    output, moved = hosts.train("mpi", "lh1", tiny_data, run_dir)
    assert "--mca btl_tcp_if_include lh1 --mca oob_tcp_if_include lh1" in output
    assert_one_rank_per_host(run_dir, "mpi")
    assert moved["lh1"] > STEPS * gradient_bytes(run_dir), moved
    assert moved["lh0"] < gradient_bytes(run_dir), moved  # ssh and rank 1's log lines only


def test_horovodrun_gloo_moves_gradients_to_a_link_the_hostname_does_not_resolve_to(hosts, tiny_data, tmp_path):
    """Needs scripts/horovod-0.28.1.patch's gloo_context.cc fix: unpatched Horovod 0.28.1 binds
    Gloo's collectives to the hostname's address whatever --network-interface says."""
    run_dir = tmp_path / "run"
    _, moved = hosts.train("gloo", "lh1", tiny_data, run_dir)
    assert_one_rank_per_host(run_dir, "gloo")
    assert moved["lh1"] > STEPS * gradient_bytes(run_dir), moved


# --- scripts/launch.sh's command line, without running anything (--dry-run) ----------------

LAUNCH_SH = ROOT / "scripts" / "launch.sh"


def dry_run(*args, env=None):
    return subprocess.run([str(LAUNCH_SH), "--dry-run", *args], cwd=ROOT, env={**job_env(), **(env or {})},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("args, error", [
    (["--launcher", "slurm", "-np", "2"], "--launcher must be gloo or mpi, not 'slurm'"),
    (["-np", "0"], "-np must be a positive integer, not '0'"),
    (["-H", "node1"], "-H entry 'node1' is not host:slots"),
    (["-np", "5", "-H", "a:2,b:2"], "-np 5 is more than the 4 slots of the hosts"),
    (["-H", "a:1", "--hostfile", "hosts.txt"], "give -H or --hostfile, not both"),
    (["--hostfile", "/nonexistent/hosts.txt"], "hostfile '/nonexistent/hosts.txt' not found"),
    (["-np", "2", "--network-interface", "nope0"], "network interface 'nope0' does not exist on this host"),
    (["-np", "2", "--frobnicate"], "unknown option '--frobnicate' (see --help)"),
    ([], "give -np, -H or --hostfile"),
])
def test_launch_sh_rejects_bad_input_with_a_one_line_error(args, error):
    result = dry_run(*args)
    assert (result.returncode, result.stderr, result.stdout) == (2, f"launch.sh: {error}\n", "")


def test_launch_sh_prints_the_exact_mpirun_command_it_would_run(tmp_path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("# two nodes\nnode1 slots=2\nnode2 slots=2\n")
    result = dry_run("--launcher", "mpi", "--hostfile", str(hostfile), "--network-interface", "lo",
                     "model=llama_tiny", "hydra.run.dir=/tmp/a b",
                     env={"OMP_NUM_THREADS": "3", "HOROVOD_FUSION_THRESHOLD": "0", "UNRELATED_TOKEN": "x"})
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("launch: ")
    # The line is valid shell: split back, it is exactly the command (arguments with spaces quoted).
    words = shlex.split(line[len("launch: "):])
    assert words[0] == "OMP_NUM_THREADS=3"  # the caller's choice wins over cores / ranks
    command = words[1:]
    assert command[:6] == ["mpirun", "-np", "4", "--hostfile", str(hostfile), "--bind-to"]
    exported = {command[i + 1] for i, word in enumerate(command) if word == "-x"}
    assert {"PATH", "PYTHONPATH", "OMP_NUM_THREADS", "HOROVOD_FUSION_THRESHOLD", "NCCL_SOCKET_IFNAME=lo"} <= exported
    assert "UNRELATED_TOKEN" not in exported
    assert "--mca btl_tcp_if_include lo --mca oob_tcp_if_include lo" in " ".join(command)
    assert command[-5:] == ["python", "-m", "app.train", "model=llama_tiny", "hydra.run.dir=/tmp/a b"]


def test_launch_sh_gives_each_local_rank_an_equal_share_of_the_cores():
    env = {k: v for k, v in job_env().items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run([str(LAUNCH_SH), "--dry-run", "-np", "2"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    cores = int(subprocess.run(["nproc"], env=env, capture_output=True, text=True, check=True).stdout)
    assert shlex.split(result.stdout)[1] == f"OMP_NUM_THREADS={max(1, cores // 2)}"
