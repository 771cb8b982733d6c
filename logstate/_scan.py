"""(temporary) scanner names, until the byte layer is split."""

from logstate._format import (  # noqa: F401
    FRAME_COMPRESSED_GROUP,
    FRAME_GROUP,
    FRAME_PLAIN,
    SCAN_WINDOW,
    Damage,
    Frame,
    WindowedScan,
    replay_frame,
    scan_records,
)
