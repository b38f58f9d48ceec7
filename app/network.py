"""The network interface an elastic job's ranks talk over, when scripts/launch.sh was given none.

    python -m app.network HOST [HOST...]   # prints the interface; or one line naming --network-interface

Without --network-interface, horovodrun's elastic driver waits for two hosts before it probes
their interfaces (up to --elastic-timeout, 600 s, printing nothing), so a job on one host never
starts. launch.sh --elastic asks here first, under a time limit, and passes the answer on:
- every host is this machine (localhost, 127.x, ::1, its name or one of its addresses): the
  loopback interface, found as Horovod finds it for local hosts (the one holding 127.0.0.1);
- otherwise Horovod's own probe of the hosts (a task server on each over ssh, each testing the
  next one's interfaces), without the wait for a second host, and bounded in time.
"""
import ipaddress
import os
import socket
import sys
from typing import List

import psutil

LOOPBACK = "127.0.0.1"


def this_machines_addresses() -> set:
    return {address.address.split("%")[0]  # an IPv6 link-local address carries its scope: fe80::1%eth0
            for addresses in psutil.net_if_addrs().values() for address in addresses
            if address.family in (socket.AF_INET, socket.AF_INET6)}


def is_this_machine(host: str, addresses: set) -> bool:
    """Whether `host` names this machine: every address it resolves to is a loopback one or one of
    this machine's own. A name that does not resolve is a ValueError."""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as error:
        raise ValueError(f"host '{host}' does not resolve ({error.strerror})") from None
    return all(ipaddress.ip_address(address).is_loopback or address in addresses for address in resolved)


def loopback_interface() -> str:
    found = sorted(name for name, addresses in psutil.net_if_addrs().items()
                   if any(address.family == socket.AF_INET and address.address == LOOPBACK for address in addresses))
    if not found:
        raise ValueError(f"no interface of this machine holds {LOOPBACK}")
    return found[0]


def probed_interface(hosts: List[str], probe_timeout_s: int) -> str:
    """Horovod's probe of the hosts over ssh (horovodrun's own, less its wait for two hosts)."""
    from horovod.runner.common.util import secret, settings, timeout  # the ssh probe's, not the loopback's
    from horovod.runner.driver import driver_service

    probe = settings.Settings(verbose=0, key=secret.make_secret_key(), start_timeout=timeout.Timeout(
        probe_timeout_s, message="Horovod's probe over ssh waited for {activity}"))
    return sorted(driver_service.get_common_interfaces(probe, hosts))[0]


def main(argv: List[str]) -> None:
    """Prints one interface (launch.sh passes one), or exits 1 with the reason in one line that
    starts with `app.network: ` (other lines may follow: multiprocessing's resource tracker
    warns of the semaphores that Horovod's probe leaves behind)."""
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit("usage: python -m app.network PROBE_TIMEOUT_S HOST [HOST...]")
    hosts = argv[1:]
    try:
        addresses = this_machines_addresses()
        if all([is_this_machine(host, addresses) for host in hosts]):  # a list: every name resolved, or one line
            print(loopback_interface())
            return
        print(probed_interface(hosts, int(argv[0])), flush=True)
        status = 0
    except Exception as error:  # noqa: BLE001 -- Horovod's probe raises bare Exceptions, of many lines
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"app.network: {reason}", file=sys.stderr, flush=True)
        status = 1
    # Horovod's probe leaves threads waiting on its ssh sessions (horovodrun, unlike this, goes on
    # to use them): end here, not when they do.
    os._exit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
