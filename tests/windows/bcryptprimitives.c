/* ProcessPrng for Wine 8 (Debian 12's wine64), which lacks bcryptprimitives.dll.
 *
 * Rust's standard library (1.78 and later) takes its randomness from ProcessPrng in
 * bcryptprimitives.dll, which every Windows since 10 has and Wine gained only in 9.0. The
 * Windows test (tests/tests/windows.rs) builds this stand-in with Debian's mingw-w64 and puts it
 * beside culvert.exe, where Windows looks first; on Windows itself the system's DLL is used and
 * this file plays no part. It draws from RtlGenRandom (advapi32's SystemFunction036), which
 * Wine 8 implements. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length)
{
    while (length > 0) {
        ULONG n = length > 0x10000000 ? 0x10000000 : (ULONG)length;
        if (!SystemFunction036(data, n))
            return FALSE;
        data += n;
        length -= n;
    }
    return TRUE;
}
