"""How many connections wait in a listening socket's accept queue, read from the kernel.

TCP: ``getsockopt(TCP_INFO)`` on a listening socket reports the current accept
queue in ``tcpi_unacked`` and the backlog in ``tcpi_sacked``.  Unix sockets have
no TCP_INFO; the same two numbers come from the sock_diag netlink interface
(UNIX_DIAG_RQLEN), which is what ``ss -xl`` shows as Recv-Q/Send-Q.
"""

from __future__ import annotations

import os
import socket
import struct

TCP_INFO_QUEUE = struct.Struct("=II")  # tcpi_unacked, tcpi_sacked at offset 24
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
UDIAG_SHOW_RQLEN = 0x10
UNIX_DIAG_RQLEN = 4
TCP_LISTEN = 10
NLMSG = struct.Struct("=IHHII")
UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
UNIX_DIAG_MSG = struct.Struct("=BBBxIII")
RTATTR = struct.Struct("=HH")


def queue_length(sock: socket.socket) -> tuple[int, int] | None:
    """(connections waiting to be accepted, backlog), or None if the kernel will not say."""
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            return TCP_INFO_QUEUE.unpack_from(info, 24)
        if sock.family == socket.AF_UNIX:
            return _unix_queue(os.fstat(sock.fileno()).st_ino)
    except OSError:
        return None
    return None


def _unix_queue(inode: int) -> tuple[int, int] | None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        req = UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 1 << TCP_LISTEN, inode, UDIAG_SHOW_RQLEN,
                                 0xFFFFFFFF, 0xFFFFFFFF)
        nl.send(NLMSG.pack(NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + req)
        data = nl.recv(65536)
    length, kind, _, _, _ = NLMSG.unpack_from(data)
    if kind == NLMSG_ERROR or len(data) < NLMSG.size + UNIX_DIAG_MSG.size:
        return None
    pos = NLMSG.size + UNIX_DIAG_MSG.size
    while pos + RTATTR.size <= length:
        attr_len, attr_type = RTATTR.unpack_from(data, pos)
        if attr_len < RTATTR.size:
            break
        if attr_type == UNIX_DIAG_RQLEN:
            return struct.unpack_from("=II", data, pos + RTATTR.size)
        pos += (attr_len + 3) & ~3
    return None
