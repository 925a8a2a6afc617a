"""A real SMTP server for the tests (PyPI aiosmtpd), requiring STARTTLS.

Usage: smtp_server.py PORT CERT_PEM KEY_PEM OUT_DIR

Writes each message it receives to OUT_DIR/NNN.eml, with an X-Test-TLS header saying
whether the session was encrypted when the message came. Prints "ready" once listening;
runs until killed.
"""

import os
import ssl
import sys
import time

from aiosmtpd.controller import Controller

PORT, CERT, KEY, OUT = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
os.makedirs(OUT, exist_ok=True)


class Save:
    def __init__(self):
        self.n = 0

    async def handle_DATA(self, server, session, envelope):
        self.n += 1
        tls = "yes" if session.ssl else "no"
        with open(os.path.join(OUT, f"{self.n:03}.eml"), "wb") as f:
            f.write(f"X-Test-TLS: {tls}\r\nX-Test-Rcpt: {','.join(envelope.rcpt_tos)}\r\n".encode())
            f.write(envelope.original_content or envelope.content)
        return "250 OK"


ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(CERT, KEY)
c = Controller(Save(), hostname="127.0.0.1", port=int(PORT), tls_context=ctx, require_starttls=True)
c.start()
print("ready", flush=True)
try:
    while True:
        time.sleep(3600)
finally:
    c.stop()
