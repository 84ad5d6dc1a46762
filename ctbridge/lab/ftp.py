"""The lab's FTP client, driven line by line: a control connection that lives across failovers,
and passive data connections opened when told (ctbridge.lab.network.FtpSession drives it).

    python -m ctbridge.lab.ftp SERVER      then, on stdin, one command a line:
      pasv            PASV: the server listens on a data port; prints {"port": N}
      retr NAME       connects to that port now and retrieves NAME over it
      get NAME        PASV and retrieval at once (a data connection of a new PASV)
      noop            NOOP on the control connection
Each answer is one JSON line: {"ok": true, ...} or {"ok": false, "error": "..."}. The server is
the lab's real one (pyftpdlib, anonymous, read-only); only ftplib of the standard library here.
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


def main(argv: list[str]) -> int:
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
