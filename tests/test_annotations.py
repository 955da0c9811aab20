"""annotations.parse_json: orjson's values where it reads the text, the standard library's where it does not."""

from __future__ import annotations

import json
import math

import pytest

import annotations

DOCUMENT = {"images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480}], "categories": [],
            "annotations": [{"id": 7, "bbox": [0.1, 2.5e-7, 1e300, -3], "segmentation": [[1, 2, 3.25]],
                             "name": "caf\u00e9 \U0001f600", "big": 2**63 - 1}]}


def test_orjson_reads_what_the_standard_library_reads():
    if annotations.orjson is None:
        pytest.skip("orjson is not installed")
    raw = json.dumps(DOCUMENT).encode()
    assert annotations.orjson.loads(raw) == json.loads(raw)
    assert annotations.parse_json(raw) == DOCUMENT


@pytest.mark.parametrize("text", ['{"bbox": [NaN, 1, Infinity, -Infinity]}', '[1, -Infinity]'])
def test_what_orjson_refuses_the_standard_library_reads(text):
    assert repr(annotations.parse_json(text.encode())) == repr(json.loads(text))
    if annotations.orjson is not None:
        with pytest.raises(annotations.orjson.JSONDecodeError):
            annotations.orjson.loads(text.encode())


def test_not_json_is_the_standard_librarys_error(monkeypatch):
    with pytest.raises(json.JSONDecodeError, match="Expecting property name"):
        annotations.parse_json(b"{not json")
    monkeypatch.setattr(annotations, "orjson", None)
    assert annotations.parse_json(json.dumps(DOCUMENT).encode()) == DOCUMENT
    assert math.isnan(annotations.parse_json(b"[NaN]")[0])
