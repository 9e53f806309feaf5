"""Benchmarks: one module per suite (`size`, `streaming`, `data`, `train`, `serve`), each with a
`run(...) -> dict` of figures and a thin argparse `main()` (`python benchmarks/<suite>.py`).

`omniforcing bench` (benchmarks/cli.py) runs the chosen suites in one process and writes their
tables into the generated region of benchmarks/RESULTS.md (benchmarks/report.py). Importing this
package imports nothing heavy; each suite is imported only when it runs.
"""
