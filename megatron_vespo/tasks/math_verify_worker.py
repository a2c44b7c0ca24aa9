"""Math-Verify in a worker process (see worker_pool.py): run as a script, it imports Math-Verify
and worker_main.py only. Request {"answer": TEXT, "reference": TEXT}, both the content of a
\\boxed{...}; answer {"equal": true|false}. Both sides are parsed as the box they came from, so
Math-Verify's LaTeX normalisation (units, \\text, degrees, percent, intervals, sets) applies to
each; anything it cannot parse or compare is "not equal".
"""

from worker_main import limit_memory, serve


def main() -> None:
    limit_memory()
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    latex = [LatexExtractionConfig()]
    latex_or_plain = [LatexExtractionConfig(), ExprExtractionConfig()]

    def judge(request: dict) -> bool:
        reference = parse("\\boxed{" + request["reference"] + "}", extraction_config=latex)
        answer = parse("\\boxed{" + request["answer"] + "}", extraction_config=latex_or_plain)
        return bool(reference and answer and verify(reference, answer))

    serve(judge)


if __name__ == "__main__":
    main()
