"""An operator's tool on an RFC 2217 serial port, for tests/tests/serial.rs: pyserial's
rfc2217:// client, unmodified. Usage: client.py PORT. Prints one JSON line per answer."""

import json
import sys

import serial


def ask(port, what, data):
    port.write(data)
    answer = port.readline()
    print(json.dumps({"what": what, "answer": answer.decode("latin-1")}), flush=True)


def main():
    url = f"rfc2217://127.0.0.1:{sys.argv[1]}"
    port = serial.serial_for_url(url, baudrate=9600, bytesize=8, parity="N", stopbits=1, timeout=10)
    ask(port, "as opened", b"LINE?\n")
    port.baudrate = 115200
    port.stopbits = serial.STOPBITS_TWO
    ask(port, "after the change", b"LINE?\n")
    # A pty keeps 8 data bits and no parity whatever is asked (Linux's pty driver), as a UART
    # without parity would: the request is refused at the gateway and the line stays.
    port.parity = serial.PARITY_EVEN
    ask(port, "after a refused change", b"LINE?\n")
    ask(port, "bytes", b"ab\xffcd\n")
    port.close()


if __name__ == "__main__":
    main()
