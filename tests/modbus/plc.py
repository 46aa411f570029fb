"""A Modbus/TCP device for tests/tests/modbus.rs: pymodbus's server on 127.0.0.1:PORT, unit 1,
holding registers 0-999 where register N holds 100 + N, coils all off. A write that reaches
it changes what the next read returns. Prints "listening" once it accepts connections."""

import asyncio
import sys
import warnings

from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.server import StartAsyncTcpServer

# The datastore classes print a notice of their replacement in pymodbus 4.
warnings.simplefilter("ignore")


async def main(port):
    # pymodbus keeps protocol address N at block address N + 1.
    device = ModbusDeviceContext(
        hr=ModbusSequentialDataBlock(1, [100 + n for n in range(1000)]),
        co=ModbusSequentialDataBlock(1, [False] * 1000),
    )
    context = ModbusServerContext(devices={1: device}, single=False)
    asyncio.get_running_loop().call_later(0.2, lambda: print("listening", flush=True))
    await StartAsyncTcpServer(context=context, address=("127.0.0.1", port))


asyncio.run(main(int(sys.argv[1])))
