"""Build of logstate's optional C extension, ``logstate._cnative``.

Everything else is in pyproject.toml. The extension is optional: where it
cannot be built (no compiler, no Python headers), the install goes on and
logstate runs in pure Python (``logstate.native`` is then False). Setting
``LOGSTATE_BUILD_NATIVE=0`` skips the build; ``LOGSTATE_NATIVE_CFLAGS`` adds
compiler flags (CI's sanitizer build passes ``-fsanitize=address,undefined``).
"""

from __future__ import annotations

import os
import shlex
import sys
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """``build_ext`` that turns a failed build into a warning (as MarkupSafe does)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            self._skip(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    @staticmethod
    def _skip(exc: Exception) -> None:
        print(
            f"warning: logstate's C extension was not built ({exc}); "
            "logstate will run in pure Python",
            file=sys.stderr,
        )


def _extensions() -> list[Extension]:
    if os.environ.get("LOGSTATE_BUILD_NATIVE", "1") == "0":
        return []
    extra = shlex.split(os.environ.get("LOGSTATE_NATIVE_CFLAGS", ""))
    return [
        Extension(
            "logstate._cnative",
            sources=sorted(glob("csrc/*.c")),
            depends=sorted(glob("csrc/*.h")),
            include_dirs=["csrc"],
            extra_compile_args=[
                "-O2",
                "-std=gnu11",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                *extra,
            ],
            extra_link_args=[flag for flag in extra if flag.startswith("-fsanitize")],
            optional=True,
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
