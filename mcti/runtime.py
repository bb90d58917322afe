"""Process-wide settings of a command-line run, set once here and never by the library.

Offline hub, and third-party chatter (transformers/diffusers "Loading weights" bars, the
accelerate advice, deprecation notes) silenced unless --verbose. Environment variables reach
the processes we start too (torchrun ranks, Ray workers); libraries already imported in this
process (tests call `main` in-process) are told directly.
"""

import os
import sys
import warnings

QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # read by transformers' bars when it is imported
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def setup_process(verbose: bool = False) -> None:
    """Offline hub always; third-party warnings and progress bars only with `verbose`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
    if verbose:
        for key, value in QUIET_ENV.items():  # undo what a quiet run in this process set
            if os.environ.get(key) == value:
                del os.environ[key]
    else:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)  # a user's own setting wins
    for name in ("transformers", "diffusers"):
        if name in sys.modules:
            logging = sys.modules[name].utils.logging
            logging.set_verbosity_warning() if verbose else logging.set_verbosity_error()
            logging.enable_progress_bar() if verbose else logging.disable_progress_bar()
