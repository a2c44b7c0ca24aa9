"""Symbolic equality in a separate process: sympy can run for minutes (or exhaust memory) on a
hostile expression, and a thread cannot be stopped, but a process can be killed.

Run as a script (not as a package module, so that it imports nothing but sympy): reads one JSON
request per line, {"a": EXPR, "b": EXPR}, with EXPR already in sympy syntax and vetted by the
parent, and writes one line {"equal": true|false}. Any failure answers false. The first line it
writes, once sympy is imported, is {"ready": true}.
"""

import json
import string
import sys


def _limit_memory(max_bytes: int) -> None:
    """Cap the address space so a runaway expression fails with MemoryError instead of swapping."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    except (ImportError, ValueError, OSError):  # not on this platform, or a lower hard limit
        pass


def main() -> None:
    _limit_memory(2 << 30)
    from sympy import Symbol, simplify
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                            parse_expr, standard_transformations)

    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    # Every single letter is a plain symbol: without this, E, I, N, O, Q, S are sympy objects.
    names = {letter: Symbol(letter) for letter in string.ascii_letters}
    # Importing sympy takes seconds: say when it is done, so the parent's per-comparison timeout
    # does not count it.
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            a, b = (parse_expr(request[k], local_dict=dict(names), transformations=transformations)
                    for k in ("a", "b"))
            equal = bool(simplify(a - b) == 0)
        except Exception:  # unparsable or unsupported: not shown equal
            equal = False
        sys.stdout.write(json.dumps({"equal": equal}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
