"""Early-exit encoders and exit heads (one interface for every encoder)."""

from earlyexit_brain.models.conformer import (  # noqa: F401
    CTCExitHeads,
    EarlyExitConformerEncoder,
    resolve_exit_layers,
)
