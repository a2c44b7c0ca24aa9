"""Symbolic equality in a separate process: sympy can run for minutes (or exhaust memory) on a
hostile expression, and a thread cannot be stopped, but a process can be killed.

Run as a script (not as a package module, so that it imports nothing but sympy and
worker_main.py): reads one JSON request per line, {"a": EXPR, "b": EXPR}, with EXPR already in
sympy syntax and vetted by the parent, and writes one line {"equal": true|false}. Any failure
answers false.
"""

import string

from worker_main import limit_memory, serve


def main() -> None:
    limit_memory()
    from sympy import Symbol, simplify
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                            parse_expr, standard_transformations)

    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    # Every single letter is a plain symbol: without this, E, I, N, O, Q, S are sympy objects.
    names = {letter: Symbol(letter) for letter in string.ascii_letters}

    def judge(request: dict) -> bool:
        a, b = (parse_expr(request[k], local_dict=dict(names), transformations=transformations)
                for k in ("a", "b"))
        return simplify(a - b) == 0

    serve(judge)


if __name__ == "__main__":
    main()
