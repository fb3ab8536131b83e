"""Socket guard for tests: every Python process started with this folder on PYTHONPATH
records (to $PRESEND_NETGUARD_LOG) and refuses any connection to a non-loopback address,
and any name lookup of a host that is not local. The end-to-end test runs the whole pipeline
under it and asserts the log stays empty: nothing calls the internet at run time.
"""

import ipaddress
import os
import socket

_LOG = os.environ.get("PRESEND_NETGUARD_LOG")
_LOCAL_NAMES = {"localhost", "", None, socket.gethostname()}


def _record(what: str) -> None:
    with open(_LOG, "a") as fh:
        fh.write(f"{os.getpid()} {what}\n")


def _is_loopback(address) -> bool:
    if not isinstance(address, tuple) or not address:
        return True  # AF_UNIX paths and the like
    host = address[0]
    if host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


if _LOG:
    _connect = socket.socket.connect
    _connect_ex = socket.socket.connect_ex
    _getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            _record(f"connect {address!r}")
            raise OSError(101, f"netguard: outbound connection to {address!r} refused")
        return _connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            _record(f"connect_ex {address!r}")
            return 101
        return _connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if not _is_loopback((name,)):
            _record(f"getaddrinfo {name!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"netguard: lookup of {name!r} refused")
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
