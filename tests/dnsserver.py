"""A real DNS server on loopback for the bots' reverse DNS checks (dnslib's DNSServer), answering
from a small zone and recording every question; and one that never answers."""

from __future__ import annotations

import ipaddress
import socket
import threading

from dnslib import AAAA, PTR, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class Zone(BaseResolver):
    """PTR records by address, A/AAAA records by name; anything else is NXDOMAIN."""

    def __init__(self) -> None:
        self.ptr: dict[str, str] = {}
        self.forward: dict[str, list[str]] = {}
        self.questions: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def add(self, ip: str, name: str, forward: list[str] | None = None) -> None:
        """`ip` has the PTR `name`, and `name` resolves to `forward` (default: [ip])."""
        self.ptr[ipaddress.ip_address(ip).reverse_pointer + "."] = name.rstrip(".") + "."
        self.forward[name.rstrip(".") + "."] = [ip] if forward is None else forward

    def asked(self, qtype: str) -> list[str]:
        with self.lock:
            return [name for name, t in self.questions if t == qtype]

    def resolve(self, request, handler):
        reply = request.reply()
        qname, qtype = str(request.q.qname), QTYPE[request.q.qtype]
        with self.lock:
            self.questions.append((qname, qtype))
        if qtype == "PTR" and qname in self.ptr:
            reply.add_answer(RR(qname, QTYPE.PTR, rdata=PTR(self.ptr[qname]), ttl=300))
        elif qtype in ("A", "AAAA") and qname in self.forward:
            for ip in self.forward[qname]:
                if ipaddress.ip_address(ip).version == (4 if qtype == "A" else 6):
                    reply.add_answer(RR(qname, getattr(QTYPE, qtype), rdata=(A if qtype == "A" else AAAA)(ip), ttl=300))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class LoopbackDNS:
    """The zone served over UDP on 127.0.0.1 (an ephemeral port) from a thread."""

    def __init__(self) -> None:
        self.zone = Zone()
        self.server = DNSServer(self.zone, address="127.0.0.1", port=0, 
                                logger=DNSLogger(logf=lambda line: None))
        self.port = self.server.server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        self.server.start_thread()

    def stop(self) -> None:
        self.server.stop()
        self.server.server.server_close()


class SilentDNS:
    """A UDP socket on loopback that reads nothing and answers nothing: a DNS server that is down."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def stop(self) -> None:
        self.sock.close()
