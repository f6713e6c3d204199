"""Child-process entry point for the MNN Python package's converter.

``python -m sd2mnn.conversion._mnnconvert ARGS`` is ``MNNConvert ARGS`` without the package's console
script (which pip-installs and phones home). With SD2MNN_NO_NETWORK=1 any socket use raises,
which proves a conversion needs no network.
"""
import os
import socket
import sys


def _forbid_network() -> None:
    def refuse(*args, **kwargs):
        raise OSError("sd2mnn: network access is disabled in the converter")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
    socket.getaddrinfo = refuse  # type: ignore[assignment]


def main(argv: list[str]) -> int:
    if os.environ.get("SD2MNN_NO_NETWORK") == "1":
        _forbid_network()
    import _tools

    # argv[0] is the program name the converter prints in its usage text.
    _tools.mnnconvert(["MNNConvert", *argv])
    # Its return value is True even when conversion failed: the caller judges the output file.
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
