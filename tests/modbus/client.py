"""A Modbus/TCP client for tests/tests/modbus.rs (pymodbus): on one connection to
127.0.0.1:PORT, reads and writes as an integrator's tool would, and prints one JSON line per
request: what it was, and the registers read or the exception code received."""

import json
import sys

from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

port = int(sys.argv[1])
client = ModbusTcpClient("127.0.0.1", port=port, timeout=10, retries=0)
if not client.connect():
    sys.exit(f"cannot connect to 127.0.0.1:{port}")


def show(what, call):
    try:
        r = call()
    except ModbusException as e:
        print(json.dumps({"what": what, "error": str(e)}), flush=True)
        return
    if r.isError():
        print(json.dumps({"what": what, "exception": r.exception_code}), flush=True)
    else:
        print(json.dumps({"what": what, "registers": list(getattr(r, "registers", []) or []),
                          "bits": [bool(b) for b in (getattr(r, "bits", []) or [])][:4]}),
              flush=True)


show("read holding 10-14", lambda: client.read_holding_registers(10, count=5, device_id=1))
show("write register 10", lambda: client.write_register(10, 7, device_id=1))
show("write coil 3", lambda: client.write_coil(3, True, device_id=1))
show("read holding 10-14", lambda: client.read_holding_registers(10, count=5, device_id=1))
show("read holding 500", lambda: client.read_holding_registers(500, count=1, device_id=1))
show("read coils 0-3", lambda: client.read_coils(0, count=4, device_id=1))
show("read unit 2", lambda: client.read_holding_registers(0, count=1, device_id=2))
client.close()
