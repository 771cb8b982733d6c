/* logstate._cnative: the C core's shared declarations.
 *
 * One extension module, one C file per part; each part adds its types and
 * functions to the module in its own init function, called by module.c.
 * Public C API only (no private CPython calls): it must build on 3.10-3.13.
 */
#ifndef LOGSTATE_NATIVE_H
#define LOGSTATE_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

/* crc.c: CRC-32C, the CPU instruction where there is one, else a table */
uint32_t ls_crc32c(uint32_t crc, const void *data, size_t size);
int ls_crc_init(PyObject *module);

/* keymap.c: the compact index (KeyMap) */
int ls_keymap_init(PyObject *module);

/* fast.c: the hot paths of set, get and flush */
int ls_fast_init(PyObject *module);

/* scan.c: the segment scanner of an open without a snapshot */
int ls_scan_init(PyObject *module);

#endif
