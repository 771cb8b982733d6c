/* logstate._cnative: module definition; each part registers itself. */
#include "native.h"

static struct PyModuleDef native_module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "logstate._cnative",
    .m_doc = "logstate's optional C core (pure Python is the reference: logstate._native).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__cnative(void)
{
    PyObject *module = PyModule_Create(&native_module);
    if (module == NULL) {
        return NULL;
    }
    if (ls_crc_init(module) < 0 || ls_keymap_init(module) < 0 || ls_fast_init(module) < 0
        || ls_scan_init(module) < 0 || ls_commit_init(module) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
