"""benchmarks/report.py: the table and the JSON line every benchmark prints."""

import json

from benchmarks.report import json_line, median_seconds, table


def test_table_aligns_headers_with_their_columns():
    rows = [{"pair": "qwen->smollm2", "s": 0.12345, "n": 12345}, {"pair": "g", "s": 2.0, "n": 7}]
    text = table(rows, [("pair", "pair", "<16"), ("median s", "s", ">10.3f"), ("tok/s", "n", ">8,")])
    assert text.split("\n") == ["pair              median s   tok/s",
                                "qwen->smollm2        0.123  12,345",
                                "g                    2.000       7"]


def test_json_line_is_one_line_led_by_the_benchmark_name():
    line = json_line("cache_size", results=[{"k": 10}])
    assert "\n" not in line and json.loads(line) == {"benchmark": "cache_size", "results": [{"k": 10}]}
    calls = []
    assert median_seconds(lambda: calls.append(1), 3) >= 0 and len(calls) == 3
