#!/usr/bin/env python3
"""`vhsm token retrieve` for many tokens in one interpreter: the real command (the `vhsm` click
group with the same argv, output and exit status) run once per token, so a check of a copy
does not pay an interpreter start per token.

    python retrieve_many.py JOBS.json  ->  one JSON line per job on stdout:
    {"token": T, "rc": exit status, "out": its stdout, "err": its stderr}

JOBS.json: [[token, argv...], ...], argv being what follows `vhsm`.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys


def main() -> int:
    from cli import main as cli_main

    cli_main._register()
    jobs = json.load(open(sys.argv[1]))  # noqa: SIM115
    results = []
    for token, *argv in jobs:
        out, err = io.StringIO(), io.StringIO()
        rc = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli_main.vhsm.main(args=argv, prog_name="vhsm", standalone_mode=True)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        results.append({"token": token, "rc": rc, "out": out.getvalue(), "err": err.getvalue()})
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
