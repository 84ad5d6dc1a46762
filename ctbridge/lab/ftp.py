"""The lab's FTP client, driven line by line: a control connection that lives across failovers,
and passive data connections opened when told (ctbridge.lab.network.FtpSession drives it); and
its server, pyftpdlib (a test dependency), anonymous and read-only.

    python -m ctbridge.lab.ftp server ADDRESS ROOT FIRST-LAST    the server, passive ports FIRST-LAST
    python -m ctbridge.lab.ftp SERVER      the client; then, on stdin, one command a line:
      pasv            PASV: the server listens on a data port; prints {"port": N}
      retr NAME       connects to that port now and retrieves NAME over it
      get NAME        PASV and retrieval at once (a data connection of a new PASV)
      noop            NOOP on the control connection
Each answer is one JSON line: {"ok": true, ...} or {"ok": false, "error": "..."}. The client
uses only ftplib of the standard library.
"""

from __future__ import annotations

import ftplib
import json
import socket
import sys
from typing import Any

TIMEOUT = 5.0  # seconds for any one step: a dropped SYN is retried by the kernel within it (1 s, 3 s)


def _retrieve(ftp: ftplib.FTP, data: socket.socket, name: str) -> dict[str, Any]:
    ftp.putcmd(f"RETR {name}")
    first = ftp.getresp()  # 125/150: the transfer starts on the data connection we opened
    got = bytearray()
    data.settimeout(TIMEOUT)
    for _ in range(100_000):  # bounded: the lab's files are small
        chunk = data.recv(65536)
        if not chunk:
            break
        got += chunk
    data.close()
    return {"ok": True, "bytes": len(got), "first": first, "reply": ftp.voidresp()}


PASSIVE_WAIT = 300  # seconds a passive port waits for its data connection (pyftpdlib's own: 30)


def serve(address: str, root: str, ports: str) -> None:
    """pyftpdlib's FTP server on port 21. A passive port waits PASSIVE_WAIT for its connection:
    a test that fails over and back between the PASV and the connection takes longer than 30 s."""
    from pyftpdlib.authorizers import DummyAuthorizer  # type: ignore[import-untyped]
    from pyftpdlib.handlers import FTPHandler  # type: ignore[import-untyped]
    from pyftpdlib.servers import FTPServer  # type: ignore[import-untyped]

    authorizer = DummyAuthorizer()
    authorizer.add_anonymous(root)
    first, _, last = ports.partition("-")
    handler = type("LabHandler", (FTPHandler,), {
        "authorizer": authorizer, "passive_ports": range(int(first), int(last) + 1),
        "passive_dtp": type("LabPassive", (FTPHandler.passive_dtp,), {"timeout": PASSIVE_WAIT})})
    server = FTPServer((address, 21), handler)
    print(f"starting FTP server on {address}:21", flush=True)
    server.serve_forever()


def main(argv: list[str]) -> int:
    if argv[0] == "server":
        serve(*argv[1:4])
        return 0
    server = argv[0]
    ftp = ftplib.FTP(timeout=TIMEOUT)
    ftp.connect(server, 21)
    ftp.login()
    ftp.voidcmd("TYPE I")
    print(json.dumps({"ok": True, "welcome": ftp.getwelcome()}), flush=True)
    port = 0
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd == "pasv":
                _host, port = ftp.makepasv()
                answer: dict[str, Any] = {"ok": True, "port": port}
            elif cmd == "retr":
                answer = _retrieve(ftp, socket.create_connection((server, port), timeout=TIMEOUT), arg)
            elif cmd == "get":
                _host, port = ftp.makepasv()
                answer = {**_retrieve(ftp, socket.create_connection((server, port), timeout=TIMEOUT), arg),
                          "port": port}
            elif cmd == "noop":
                answer = {"ok": True, "reply": ftp.voidcmd("NOOP")}
            else:
                answer = {"ok": False, "error": f"unknown command {cmd!r}"}
        except (OSError, EOFError, ftplib.Error) as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    ftp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
