"""The libraries under the book: their versions, and a way to keep their chatter out of a chapter.

Why a module: a stored notebook output, a benchmark record and a model card all say which
versions made them, and all of them must not depend on which optional extras happen to be
installed (transformers and diffusers print warnings and progress bars that do).
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

RECORDED_PACKAGES = (
    "torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "Pillow", "sdhelpers",
)


def library_versions(packages=RECORDED_PACKAGES) -> dict[str, str]:
    """Python's version and each installed package's (one that is not installed is left out)."""
    import torch

    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    if torch.version.cuda:
        found["cuda"] = torch.version.cuda
    return found


class quiet_libraries:
    """Silence the import-time and load-time chatter of transformers and diffusers.

    Their warnings (a missing optional torchvision) and progress bars ("Loading weights") are noise in a
    chapter and, worse, they make the notebooks' stored outputs depend on the installed extras. Both
    libraries are imported first, because importing them resets their loggers' levels.
    """

    def __enter__(self):
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        self._libraries = (diffusers_logging, transformers_logging)
        self._levels = [lib.get_verbosity() for lib in self._libraries]
        self._bars = [lib.is_progress_bar_enabled() for lib in self._libraries]
        for lib in self._libraries:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        for lib, level, bars in zip(self._libraries, self._levels, self._bars):
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()
