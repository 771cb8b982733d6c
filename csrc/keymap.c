/* logstate._cnative: keymap (not built yet: registers nothing). */
#include "native.h"

int
ls_keymap_init(PyObject *module)
{
    return 0;
}
