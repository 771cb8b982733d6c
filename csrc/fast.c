/* logstate._cnative: fast (not built yet: registers nothing). */
#include "native.h"

int
ls_fast_init(PyObject *module)
{
    return 0;
}
