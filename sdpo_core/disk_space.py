"""Why a checkpoint could not be written, when the reason is a full disk.

torch writes checkpoints through its own zip writer, which reports a full disk as "unexpected pos" or
"iostream error" rather than ENOSPC; a user reading that cannot tell the run stopped for lack of space.
"""

from __future__ import annotations

import errno
import os
import shutil

LOW_FREE_BYTES = 64 * 2**20  # after a failed write the partial file has taken what was left: near zero means full


def full_disk_message(folder: str | os.PathLike[str], error: BaseException,
                      low_free_bytes: int = LOW_FREE_BYTES) -> str | None:
    """A message naming the full disk under `folder` if that is why `error` happened, else None.

    The disk counts as full when the error is ENOSPC or when the free space left on it is below `low_free_bytes`.
    """
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    out_of_space = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if not out_of_space and free >= low_free_bytes:
        return None
    return (f"writing a checkpoint under {os.fspath(folder)} failed: its disk is full ({free / 2**20:.1f} MiB free). "
            f"Free space there or set output_dir (and save_total_limit) elsewhere; the last complete checkpoint "
            f"can be resumed. The write failed with: {error}")
