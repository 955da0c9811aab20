"""annotations.parse_json: msgspec's values where it reads the text, the standard library's where it does not."""

from __future__ import annotations

import json
import math

import pytest

import annotations

DOCUMENT = {"images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480}], "categories": [],
            "annotations": [{"id": 7, "bbox": [0.1, 2.5e-7, 1e300, -3], "segmentation": [[1, 2, 3.25]],
                             "name": "caf\u00e9 \U0001f600", "big": 2**80}]}


def test_msgspec_reads_what_the_standard_library_reads():
    if annotations.msgspec is None:
        pytest.skip("msgspec is not installed")
    raw = json.dumps(DOCUMENT).encode()
    assert annotations.msgspec.json.decode(raw) == json.loads(raw)
    assert annotations.parse_json(raw) == DOCUMENT


@pytest.mark.parametrize("raw", [b'{"bbox": [NaN, 1, Infinity, -Infinity]}', b"[1, 1e400]", b"\xef\xbb\xbf[1, 2]"])
def test_what_msgspec_refuses_the_standard_library_reads(raw):
    assert repr(annotations.parse_json(raw)) == repr(json.loads(raw))
    if annotations.msgspec is not None:
        with pytest.raises(annotations.msgspec.DecodeError):
            annotations.msgspec.json.decode(raw)


def test_not_json_is_the_standard_librarys_error(monkeypatch):
    with pytest.raises(json.JSONDecodeError, match="Expecting property name"):
        annotations.parse_json(b"{not json")
    monkeypatch.setattr(annotations, "msgspec", None)
    assert annotations.parse_json(json.dumps(DOCUMENT).encode()) == DOCUMENT
    assert math.isnan(annotations.parse_json(b"[NaN]")[0])
