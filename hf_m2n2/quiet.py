"""Loading quietly: transformers' and diffusers' per-load progress bars are noise in a run's output."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _NoTorchvisionNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to PIL without torchvision (nothing to act on:
    torchvision is not a dependency); every other warning, e.g. weights left uninitialized, still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Within the block, transformers and diffusers show no progress bars, and not the torchvision notice.

    Example:
        >>> with quiet_loading():  # doctest: +SKIP
        ...     model = CLIPModel.from_pretrained(path)
    """
    from transformers.utils import logging as hf_logging

    libraries = [hf_logging]
    try:
        from diffusers.utils import logging as diffusers_logging

        libraries.append(diffusers_logging)
    except ImportError:  # diffusers is an extra
        pass
    bars = [(lib, lib.is_progress_bar_enabled()) for lib in libraries]
    handlers = [h for lib in libraries for h in lib._get_library_root_logger().handlers]
    notice = _NoTorchvisionNotice()
    for lib in libraries:
        lib.disable_progress_bar()
    for handler in handlers:
        handler.addFilter(notice)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(notice)
        for lib, enabled in bars:
            if enabled:
                lib.enable_progress_bar()
