"""The one check of an output file the tools will write (`replay --plot`, `slice -o`):
made before any work, so a long replay or a big read does not end in an unwritable path.
Raises ValueError with one line naming the flag and what is wrong."""
import os


def check_output_path(path, flag):
    """Refuses `path` if it is a directory, its folder does not exist, or it cannot be
    opened for writing (an existing file is left as it was; a new one is not left behind)."""
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path} is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag}: cannot write {path}: no directory {folder}")
    existed = os.path.exists(path)
    try:
        open(path, "ab").close()
    except OSError as e:
        raise ValueError(f"{flag}: cannot write {path}: {e.strerror or e}") from None
    if not existed:
        os.remove(path)
