"""model_server.staged_read: a safetensors file read through staging buffers equals safetensors' own
``load_file``, tensor by tensor, whatever the chunk size; a file it does not take is a one-line error, and
``MODEL_SERVER_STAGED_READ=1`` serves the same tokens as the default read."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_server.staged_read import StagedReadError, read_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w_bf16": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "w_f16": torch.randn(5, 3, 2, generator=g).to(torch.float16),
        "w_f32": torch.randn(129, generator=g),
        "q_i32": torch.randint(-2**31, 2**31 - 1, (7, 9), generator=g, dtype=torch.int32),
        "idx_i64": torch.randint(0, 1000, (11,), generator=g, dtype=torch.int64),
        "odd_u8": torch.randint(0, 255, (3,), generator=g, dtype=torch.uint8),    # 3 bytes: misaligns what follows
        "mask": torch.rand(13, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "i8": torch.randint(-128, 127, (6,), generator=g, dtype=torch.int8),
    }


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 1 << 20])
def test_equals_load_file_at_any_chunk_size(tmp_path, chunk):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    want = load_file(str(path))
    got = read_file(path, "cpu", chunk_bytes=chunk)
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name


def _raw(tmp_path, header: dict, data: bytes, length: int | None = None):
    blob = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


@pytest.mark.parametrize("header,data,length,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "do not hold"),
    ({"a": {"dtype": "F8_E9", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, None, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "do not hold"),
    ({}, b"", 1 << 40, "does not fit"),
    (["not", "an", "object"], b"", None, "not a JSON object"),
])
def test_a_file_it_does_not_take_is_a_one_line_error(tmp_path, header, data, length, match):
    with pytest.raises(StagedReadError, match=match) as info:
        read_file(_raw(tmp_path, header, data, length), "cpu")
    assert "\n" not in str(info.value)


def test_a_header_that_is_not_json(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(StagedReadError, match="not JSON"):
        read_file(path, "cpu")
    path.write_bytes(b"\1\2")
    with pytest.raises(StagedReadError, match="shorter than"):
        read_file(path, "cpu")


def test_the_switch_loads_the_same_model(tiny_model_dir, monkeypatch):
    from model_server.loading import LoadError, load_model

    from model_server import staged_read

    calls = []
    real = staged_read.read_file

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(args)                  # only a read that returned
        return out

    monkeypatch.setattr(staged_read, "read_file", counted)
    plain = load_model(tiny_model_dir, "cpu", "none", True)
    assert calls == []
    monkeypatch.setenv("MODEL_SERVER_STAGED_READ", "1")
    staged = load_model(tiny_model_dir, "cpu", "none", True)
    assert len(calls) == 1                  # read by this reader, not load_file after a fallback
    assert staged.load_path == plain.load_path == "native"
    a, b = plain.model.state_dict(), staged.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    monkeypatch.setenv("MODEL_SERVER_STAGED_READ", "yes")
    with pytest.raises(LoadError, match="MODEL_SERVER_STAGED_READ must be 0 or 1"):
        load_model(tiny_model_dir, "cpu", "none", True)


def test_the_read_benchmark_runs_on_cpu(tiny_model_dir, tmp_path):
    """benchmarks/read_weights.py: both readers timed on one file, the same tensors, a report."""
    import read_weights  # benchmarks/read_weights.py

    assert read_weights.main(["--model-dir", str(tiny_model_dir), "--device", "cpu", "--reps", "2", "--chunk-mb", "1",
                              "--commit", "test", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "read_weights.json").read_text())
    assert report["identical_tensors"] is True and len(report["seconds"]["staged"]) == 2
    assert "| staged |" in (tmp_path / "read_weights.md").read_text()
    with pytest.raises(SystemExit) as exit_info:           # no model.safetensors there: a usage error
        read_weights.main(["--model-dir", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_short_reads_are_completed_and_a_short_file_is_an_error():
    import io

    from model_server.staged_read import _fill

    class Trickle(io.RawIOBase):          # a reader that returns at most 3 bytes per call
        def __init__(self, data: bytes) -> None:
            self.data, self.pos = data, 0

        def readinto(self, b) -> int:
            n = min(3, len(b), len(self.data) - self.pos)
            b[:n] = self.data[self.pos:self.pos + n]
            self.pos += n
            return n

    buf = bytearray(10)
    _fill(Trickle(bytes(range(10))), memoryview(buf))
    assert bytes(buf) == bytes(range(10))
    with pytest.raises(StagedReadError, match="2 bytes early"):
        _fill(Trickle(bytes(8)), memoryview(bytearray(10)))
