#!/usr/bin/env python3
"""Read a lora-doctor junit.xml with a real JUnit consumer (the `junitparser` package) and check it.

    pip install junitparser
    scripts/check_junit.py junit.xml [--expect pass|fail]

Checks that the file parses, that every <testsuite> carries the tests/failures/skipped counts of its
own test cases, that the <testsuites> totals add up, that every failure has a message and a body (the
finding messages and advice), and that the suites are the ones lora-doctor writes: `structure`, then
one per precision (or `merge` when no merge was evaluated). Prints one line per test case.

With --expect, the gate's outcome must match: `fail` needs at least one failure, `pass` none.

Exit status: 0 when every check holds, 1 when one does not, 2 when the file cannot be read.
The Rust integration tests check the same file with quick-xml, so CI does not need Python.
"""
import argparse
import sys

try:
    from junitparser import Failure, JUnitXml, Skipped
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("check_junit.py needs junitparser: pip install junitparser")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--expect", choices=["pass", "fail"])
    args = parser.parse_args()
    try:
        xml = JUnitXml.fromfile(args.path)
    except Exception as e:  # noqa: BLE001 - any parse error means "cannot read"
        print(f"{args.path}: cannot parse: {e}", file=sys.stderr)
        return 2

    problems = []
    total = failed = skipped = 0
    names = []
    for suite in xml:
        names.append(suite.name)
        cases = list(suite)
        s_failed = sum(1 for c in cases if any(isinstance(r, Failure) for r in c.result))
        s_skipped = sum(1 for c in cases if any(isinstance(r, Skipped) for r in c.result))
        for attr, actual in (("tests", len(cases)), ("failures", s_failed), ("skipped", s_skipped)):
            declared = getattr(suite, attr)
            if declared != actual:
                problems.append(f"suite {suite.name}: {attr}={declared} but {actual} test cases")
        for case in cases:
            outcome = "passed"
            for result in case.result:
                if isinstance(result, Failure):
                    outcome = "FAILED"
                    if not result.message or not (result.text or "").strip():
                        problems.append(f"{suite.name} / {case.name}: failure without message or body")
                elif isinstance(result, Skipped):
                    outcome = f"skipped ({result.message})"
            if not case.name or not case.classname:
                problems.append(f"suite {suite.name}: a test case without name or classname")
            print(f"{suite.name:<28} {case.name:<48} {outcome}")
        total += len(cases)
        failed += s_failed
        skipped += s_skipped

    for attr, actual in (("tests", total), ("failures", failed), ("skipped", skipped)):
        declared = getattr(xml, attr)
        if declared != actual:
            problems.append(f"testsuites: {attr}={declared} but {actual}")
    if not names or names[0] != "lora-doctor.structure":
        problems.append(f"the first suite must be lora-doctor.structure, got {names[:1]}")
    if args.expect == "fail" and failed == 0:
        problems.append("expected the gate to fail, but no test case failed")
    if args.expect == "pass" and failed > 0:
        problems.append(f"expected the gate to pass, but {failed} test case(s) failed")

    print(f"{total} tests, {failed} failed, {skipped} skipped")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
