/* logstate._cnative: CRC-32C (Castagnoli), the checksum of every record.
 *
 * Owns: ls_crc32c (the C entry of the other parts), the choice, made once at
 * module init from what the CPU says at run time (never from compile flags),
 * between the CPU's CRC-32C instruction (x86-64 SSE 4.2, ARMv8 CRC) and a
 * slicing-by-8 table, and the Python functions crc32c, crc_implementation and
 * _force_crc_table (tests: run the table on a CPU that has the instruction).
 * Must never: know about records; hold the GIL over a large input.
 */
#include "native.h"

#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LS_CRC_X86 1
#include <nmmintrin.h>
#elif defined(__aarch64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define LS_CRC_ARM 1
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#endif

#define CRC_POLY 0x82F63B78u /* CRC-32C, reflected */
#define GIL_FREE_SIZE 65536  /* inputs at least this long are summed without the GIL */

static uint32_t crc_table[8][256];

typedef uint32_t (*crc_fn)(uint32_t crc, const unsigned char *p, size_t size);

/* ------------------------------------------------------------------ slicing-by-8 */
static void
crc_table_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++) {
            crc = (crc >> 1) ^ (CRC_POLY & (0u - (crc & 1u)));
        }
        crc_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = crc_table[0][n];
        for (int t = 1; t < 8; t++) {
            crc = crc_table[0][crc & 0xFF] ^ (crc >> 8);
            crc_table[t][n] = crc;
        }
    }
}

static uint32_t
crc_by_table(uint32_t crc, const unsigned char *p, size_t size)
{
    while (size && ((uintptr_t)p & 7)) {
        crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
        size--;
    }
    while (size >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        word = __builtin_bswap64(word);
#endif
        uint32_t low = (uint32_t)word ^ crc;
        uint32_t high = (uint32_t)(word >> 32);
        crc = crc_table[7][low & 0xFF] ^ crc_table[6][(low >> 8) & 0xFF]
              ^ crc_table[5][(low >> 16) & 0xFF] ^ crc_table[4][low >> 24]
              ^ crc_table[3][high & 0xFF] ^ crc_table[2][(high >> 8) & 0xFF]
              ^ crc_table[1][(high >> 16) & 0xFF] ^ crc_table[0][high >> 24];
        p += 8;
        size -= 8;
    }
    while (size--) {
        crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    }
    return crc;
}

/* ------------------------------------------------------------------ the instruction */
#ifdef LS_CRC_X86
__attribute__((target("sse4.2"))) static uint32_t
crc_by_instruction(uint32_t crc, const unsigned char *p, size_t size)
{
    while (size && ((uintptr_t)p & 7)) {
        crc = _mm_crc32_u8(crc, *p++);
        size--;
    }
    uint64_t crc64 = crc;
    while (size >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        crc64 = _mm_crc32_u64(crc64, word);
        p += 8;
        size -= 8;
    }
    crc = (uint32_t)crc64;
    while (size--) {
        crc = _mm_crc32_u8(crc, *p++);
    }
    return crc;
}

static int
cpu_has_instruction(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2");
}
#define INSTRUCTION_NAME "sse4.2"
#elif defined(LS_CRC_ARM)
__attribute__((target("+crc"))) static uint32_t
crc_by_instruction(uint32_t crc, const unsigned char *p, size_t size)
{
    while (size && ((uintptr_t)p & 7)) {
        crc = __builtin_aarch64_crc32cb(crc, *p++);
        size--;
    }
    while (size >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        crc = __builtin_aarch64_crc32cx(crc, word);
        p += 8;
        size -= 8;
    }
    while (size--) {
        crc = __builtin_aarch64_crc32cb(crc, *p++);
    }
    return crc;
}

static int
cpu_has_instruction(void)
{
    return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
}
#define INSTRUCTION_NAME "armv8-crc"
#endif

static crc_fn crc_impl = crc_by_table;
static int crc_hardware = 0; /* the CPU has the instruction */

uint32_t
ls_crc32c(uint32_t crc, const void *data, size_t size)
{
    return ~crc_impl(~crc, (const unsigned char *)data, size);
}

static const char *
implementation_name(void)
{
#ifdef INSTRUCTION_NAME
    if (crc_impl == crc_by_instruction) {
        return INSTRUCTION_NAME;
    }
#endif
    return "table";
}

/* ------------------------------------------------------------------ Python */
static PyObject *
py_crc32c(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "crc32c(data, crc=0) takes 1 or 2 arguments");
        return NULL;
    }
    uint32_t crc = 0;
    if (nargs == 2) {
        unsigned long value = PyLong_AsUnsignedLong(args[1]);
        if (value == (unsigned long)-1 && PyErr_Occurred()) {
            return NULL;
        }
        if (value > 0xFFFFFFFFul) {
            PyErr_SetString(PyExc_OverflowError, "crc must fit in 32 bits");
            return NULL;
        }
        crc = (uint32_t)value;
    }
    if (PyBytes_CheckExact(args[0]) && PyBytes_GET_SIZE(args[0]) < GIL_FREE_SIZE) {
        /* the hot case: no buffer export */
        crc = ls_crc32c(crc, PyBytes_AS_STRING(args[0]), (size_t)PyBytes_GET_SIZE(args[0]));
        return PyLong_FromUnsignedLong(crc);
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (view.len >= GIL_FREE_SIZE) {
        Py_BEGIN_ALLOW_THREADS
        crc = ls_crc32c(crc, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    }
    else {
        crc = ls_crc32c(crc, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}

static PyObject *
py_crc_implementation(PyObject *module, PyObject *unused)
{
    return PyUnicode_FromString(implementation_name());
}

static PyObject *
py_force_crc_table(PyObject *module, PyObject *arg)
{
    int force = PyObject_IsTrue(arg);
    if (force < 0) {
        return NULL;
    }
#ifdef INSTRUCTION_NAME
    crc_impl = (force || !crc_hardware) ? crc_by_table : crc_by_instruction;
#endif
    return PyUnicode_FromString(implementation_name());
}

static PyMethodDef crc_methods[] = {
    {"crc32c", (PyCFunction)(void (*)(void))py_crc32c, METH_FASTCALL,
     "crc32c(data, crc=0) -> int\n\nCRC-32C (Castagnoli) of a bytes-like object, continuing "
     "from crc (0 to start)."},
    {"crc_implementation", py_crc_implementation, METH_NOARGS,
     "crc_implementation() -> str\n\nThe CRC-32C in use: the CPU instruction's name "
     "(\"sse4.2\", \"armv8-crc\") or \"table\"."},
    {"_force_crc_table", py_force_crc_table, METH_O,
     "_force_crc_table(force) -> str\n\nTests: use the table (True) or the instruction "
     "where the CPU has it (False); returns crc_implementation()."},
    {NULL, NULL, 0, NULL},
};

int
ls_crc_init(PyObject *module)
{
    crc_table_init();
#ifdef INSTRUCTION_NAME
    crc_hardware = cpu_has_instruction();
    if (crc_hardware) {
        crc_impl = crc_by_instruction;
    }
#endif
    if (ls_crc32c(0, "123456789", 9) != 0xE3069283u) {
        PyErr_SetString(PyExc_ImportError, "logstate._cnative: CRC-32C check value mismatch");
        return -1;
    }
    return PyModule_AddFunctions(module, crc_methods);
}
