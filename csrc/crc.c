/* logstate._cnative: crc (not built yet: registers nothing). */
#include "native.h"

int
ls_crc_init(PyObject *module)
{
    return 0;
}

uint32_t
ls_crc32c(uint32_t crc, const void *data, size_t size)
{
    /* bitwise reference until the table and the instruction arrive */
    const unsigned char *p = data;
    crc = ~crc;
    while (size--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++) {
            crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
        }
    }
    return ~crc;
}
