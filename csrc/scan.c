/* logstate._cnative: scan (not built yet: registers nothing). */
#include "native.h"

int
ls_scan_init(PyObject *module)
{
    return 0;
}
