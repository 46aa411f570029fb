"""A device on a serial line, for tests/tests/serial.rs.

It holds the master side of a pty pair and prints the slave's path, which culvertd opens as
its serial port. A single pty pair, not socat's two: the master reads the slave's termios
(Linux answers TCGETS2 on a master with its slave's settings), so the line settings culvertd
applies, by its rule or on an RFC 2217 client's request, are seen here as a device would see
them. socat links two ptys with separate settings, which would hide them.

Each line it receives is answered on its own line: "LINE?" with the line's settings
("LINE 19200 8N2"; Linux's pty driver keeps 8 data bits and no parity, whatever is set),
anything else upper-cased after "DEVICE: ". Bytes are bytes: 0xFF
passes through.
"""

import fcntl
import os
import struct
import sys
import termios
import tty

# _IOR('T', 0x2A, struct termios2): the settings with any baud rate (serial2 uses BOTHER).
TCGETS2 = 0x802C542A


def line_settings(fd):
    t = fcntl.ioctl(fd, TCGETS2, bytes(44))
    cflag = struct.unpack_from("I", t, 8)[0]
    ospeed = struct.unpack_from("I", t, 40)[0]
    bits = {termios.CS5: 5, termios.CS6: 6, termios.CS7: 7, termios.CS8: 8}[cflag & termios.CSIZE]
    parity = "N"
    if cflag & termios.PARENB:
        parity = "O" if cflag & termios.PARODD else "E"
    stop = 2 if cflag & termios.CSTOPB else 1
    return f"LINE {ospeed} {bits}{parity}{stop}"


def main():
    master, slave = os.openpty()
    tty.setraw(slave)
    # The slave stays open here too: with no process holding it, reads on the master fail.
    print(os.ttyname(slave), flush=True)
    pending = b""
    while True:
        data = os.read(master, 4096)
        if not data:
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if line == b"LINE?":
                reply = line_settings(master).encode()
            else:
                reply = b"DEVICE: " + line.upper()
            os.write(master, reply + b"\r\n")


if __name__ == "__main__":
    sys.exit(main())
