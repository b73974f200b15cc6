"""The CUDA W4A16 kernel's layout and launch rules (model_server/int4_mma.py), on CPU.

The kernel itself needs a GPU; here its arithmetic is replayed fragment by fragment, as the PTX ISA defines the
operands of ``mma.m16n8k16`` and as ``int4_mma.cu`` fills them (the 16-byte activation loads, the word's nibbles,
the bf16x2 dequantization), and the result is compared with ``x @ dequant(q).T``. A wrong nibble order, K order
or scale pairing in :func:`int4_mma.pack` fails it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model_server import int4_mma, int4_mma_build
from model_server.int4_quant import dequantize_groupwise, quantize_groupwise


def _bf16_bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    return (bits.to(torch.int32) << 16).view(torch.float32)


def _dq(word: torch.Tensor, shift: int, s_bits: torch.Tensor, z_bits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernel's ``dq``: the two bf16 halves of ((word >> shift) & 0x000F000F | 0x43004300), minus 136, times
    the scale plus the zero, rounded once to bf16."""
    v = ((word >> shift) & 0x000F000F) | 0x43004300
    out = []
    for half in (v & 0xFFFF, (v >> 16) & 0xFFFF):
        q8 = _bf16_bits_to_float(half) - 136.0                         # exact: q - 8
        s, z = _bf16_bits_to_float(s_bits), _bf16_bits_to_float(z_bits)
        out.append((q8.double() * s.double() + z.double()).float().to(torch.bfloat16).float())
    return tuple(out)


def emulate(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """y [M, N] as the kernel computes it, one 16x16 A fragment and 16x8 B fragment per lane at a time."""
    m, k = x.shape
    t, kb = words.shape[:2]
    n = t * 16
    w64 = words.to(torch.int64) & 0xFFFFFFFF
    sc = scales.to(torch.int64) & 0xFFFFFFFF                            # [tile, group, g, 2]
    xp = torch.zeros(8 * ((m + 7) // 8), k)
    xp[:m] = x.float()
    y = torch.zeros(n, xp.shape[0])
    for blk in range(kb):
        grp = blk * 64 // group
        for j in range(4):
            a = torch.zeros(t, 16, 16)                                  # logical A per tile: [row, col]
            b = torch.zeros(16, xp.shape[0])                            # logical B: [k, token]
            for lane in range(32):
                g, c = lane >> 2, lane & 3
                word = w64[:, blk, lane, j]                             # [tile]
                sx, zx = sc[:, grp, g, 0], sc[:, grp, g, 1]
                s_lo, s_hi, z_lo, z_hi = sx & 0xFFFF, (sx >> 16) & 0xFFFF, zx & 0xFFFF, (zx >> 16) & 0xFFFF
                a0, a1 = _dq(word, 0, s_lo, z_lo)
                a2, a3 = _dq(word, 4, s_hi, z_hi)
                a4, a5 = _dq(word, 8, s_lo, z_lo)
                a6, a7 = _dq(word, 12, s_hi, z_hi)
                a[:, g, 2 * c], a[:, g, 2 * c + 1] = a0, a1             # PTX ISA, m16n8k16 A fragment
                a[:, g + 8, 2 * c], a[:, g + 8, 2 * c + 1] = a2, a3
                a[:, g, 2 * c + 8], a[:, g, 2 * c + 9] = a4, a5
                a[:, g + 8, 2 * c + 8], a[:, g + 8, 2 * c + 9] = a6, a7
                # the 16-byte shared load at 16c + 8 * (j // 2); step j uses its (x, y) or (z, w) pair
                base = blk * 64 + 16 * c + 8 * (j // 2) + 4 * (j % 2)
                for tok0 in range(0, xp.shape[0], 8):
                    tok = tok0 + g
                    b[2 * c, tok], b[2 * c + 1, tok] = xp[tok, base], xp[tok, base + 1]
                    b[2 * c + 8, tok], b[2 * c + 9, tok] = xp[tok, base + 2], xp[tok, base + 3]
            y += (a @ b).reshape(n, -1)
    return y[:, :m].t()


@pytest.mark.parametrize("m,n,k,group", [(1, 32, 128, 128), (5, 16, 256, 64), (9, 48, 256, 128)])
def test_fragment_replay_matches_the_dequantized_product(m: int, n: int, k: int, group: int) -> None:
    torch.manual_seed(m * 7 + n)
    w = torch.randn(n, k) * 0.05
    q, sz32 = quantize_groupwise(w, group)
    sz = sz32.to(torch.bfloat16)
    words, scales = int4_mma.pack(q, sz, group)
    x = torch.randn(m, k).to(torch.bfloat16)
    ref = x.float() @ dequantize_groupwise(q, sz, group).to(torch.bfloat16).float().t()
    got = emulate(x, words, scales, group)
    assert got.shape == (m, n)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), (got - ref).abs().max()


def test_pack_unpack_round_trip_and_shapes() -> None:
    torch.manual_seed(0)
    q = torch.randint(0, 16, (64, 256), dtype=torch.uint8)
    sz = torch.randn(2, 64, 2).to(torch.bfloat16)
    words, scales = int4_mma.pack(q, sz, 128)
    assert words.dtype == torch.int32 and words.shape == (4, 4, 32, 4)
    assert scales.dtype == torch.int32 and scales.shape == (4, 2, 8, 2)
    assert torch.equal(int4_mma.unpack(words), q)
    # scale pair of lane group g in tile t: rows t*16+g (low half) and t*16+g+8 (high half)
    bits = sz.view(torch.int16).to(torch.int32) & 0xFFFF
    assert int(scales[1, 0, 3, 0]) & 0xFFFF == int(bits[0, 16 + 3, 0])
    assert (int(scales[1, 0, 3, 1]) >> 16) & 0xFFFF == int(bits[0, 16 + 3 + 8, 1])


@pytest.mark.parametrize("n,k,group,ok", [(3072, 2048, 128, True), (2048, 8192, 64, True), (24, 2048, 128, False),
                                          (2048, 2048, 32, False), (2048, 96, 64, False), (2048, 2048, 96, False)])
def test_holds(n: int, k: int, group: int, ok: bool) -> None:
    assert int4_mma.holds(n, k, group) is ok
    if not ok:
        with pytest.raises(ValueError, match="cannot hold"):
            int4_mma.pack(torch.zeros(n, k, dtype=torch.uint8), torch.zeros(max(k // group, 1), n, 2), group)


@pytest.mark.parametrize("m", [1, 8, 9, 16, 17, 33, 64])
@pytest.mark.parametrize("n,k", [(3072, 2048), (2048, 8192), (16384, 2048), (128256, 2048)])
def test_choose_config_fits_the_step(m: int, n: int, k: int) -> None:
    cfg = int4_mma.choose_config(m, n, k, 132)
    blocks = k // int4_mma.BLOCK_K
    assert cfg.nt * 8 >= m and (cfg.nt == 1 or (cfg.nt // 2) * 8 < m)
    assert blocks % cfg.split == 0 and blocks // cfg.split >= 4
    assert cfg.smem_bytes() <= int4_mma.MAX_SMEM
    assert cfg.grid_x(n) * cfg.r * cfg.warps * 16 >= n
    if n >= 65536:
        assert cfg.split == 1                        # the LM head fills the card without splitting K
    assert cfg.flat == 1 and int4_mma.fits(cfg, m, k)   # FLAT measured never slower (2026-12-05 22:30 H100 sweep)
    assert int4_mma.rule_config(m, n, k, 132).flat == 0  # the rule as served before: the A/B baseline


def test_config_names_sizes_and_grids_follow_the_source() -> None:
    assert int4_mma.Config(8, 1, 4, 4, 2).name() == "w4a16_mma<8,1,4,4>"      # the defaults: the served kernel
    assert int4_mma.Config(8, 1, 4, 4, 2, flat=1).name() == "w4a16_mma<8,1,4,4,1>"
    assert int4_mma.Config(8, 1, 16, 4, 2, flat=1, kw=4).name() == "w4a16_mma<8,1,16,4,1,4>"
    src = int4_mma_build.SOURCE_PATH.read_text()
    assert "template <int NT, int R, int WARPS, int STAGES, int FLAT = 0, int KW = 1, int GLU = 0>" in src
    glu = int4_mma.Config(1, 4, 4, 4, 4, 1, 1, 1)              # the GLU epilogue: r gate tiles then their up tiles
    assert glu.name() == "w4a16_mma<1,4,4,4,1,1,1>"
    assert glu.grid_x(16384) == int4_mma.Config(1, 4, 4, 4, 4, 1).grid_x(16384) == 64   # as many tiles per CTA
    plain, kw = int4_mma.Config(8, 1, 4, 4, 1), int4_mma.Config(8, 1, 16, 4, 1, 1, 4)
    assert kw.row_groups() == plain.warps and kw.grid_x(3072) == plain.grid_x(3072) == 48   # same rows per CTA
    ring = 4 * (64 * 72 * 2 + 4 * 576)                          # 4 stages: activations, 4 tiles' weights + scales
    assert plain.smem_bytes() == ring == int4_mma.Config(8, 1, 8, 4, 1, 1, 2).smem_bytes()   # hand-over fits
    assert kw.smem_bytes() == 3 * 4 * 1 * 8 * 32 * 16 > ring     # 3 warps x 4 groups x 8 token tiles x 32 float4


def test_the_benchmarks_sweep_holds_only_configs_that_fit() -> None:
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from int4_mma_configs import kw_twin, sweep_configs
    for m, n, k in ((1, 3072, 2048), (8, 16384, 2048), (16, 2048, 8192), (64, 128256, 2048), (64, 2048, 2048)):
        cfgs = sweep_configs(m, n, k, 132)
        base = int4_mma.rule_config(m, n, k, 132)
        assert cfgs[:3] == [base, dataclasses.replace(base, flat=1), kw_twin(base)] and len(set(cfgs)) == len(cfgs)
        for c in cfgs:
            assert c.nt * 8 >= m and (k // 64) % c.split == 0 and c.smem_bytes() <= int4_mma.MAX_SMEM
            assert c.warps % c.kw == 0 and c.warps <= 16 and c.kw in (1, 2, 4) and (c.kw == 1 or c.flat == 1)
        assert any(c.kw == 4 for c in cfgs) and any(c.kw == 2 for c in cfgs)
        assert all(c.flat == 1 for c in cfgs[1:])        # only the rule's own config without FLAT (the A/B)


def test_token_tiles_rejects_rows_out_of_range() -> None:
    with pytest.raises(ValueError, match="1..64 rows"):
        int4_mma.token_tiles(65)
    with pytest.raises(ValueError, match="1..64 rows"):
        int4_mma.token_tiles(0)


def test_source_is_shipped_with_the_package() -> None:
    src = int4_mma_build.SOURCE_PATH.read_text()
    assert "w4a16_mma" in src and "mma.sync.aligned.m16n8k16" in src
    assert f"XROW = {int4_mma.XROW}" in src


# ---- the "mma" mode of model_server/int4.py (the choice, the dispatch, the layers' buffers, merging) ----

def test_auto_takes_the_mma_kernel_where_it_builds_and_mixed_where_it_does_not() -> None:
    from model_server.int4 import AUTO_MODE, MMA_MAX_ROWS, choose_compute, step_kernel
    from model_server.switches import SwitchValueError
    auto = choose_compute("cuda", (9, 0), triton=True, mma=True)
    assert (auto.int4_kernel, auto.rows_kernel) == ("mma", "triton")
    assert choose_compute("cuda", (9, 0), triton=True, mma=False) == choose_compute("cuda", (9, 0), True, AUTO_MODE)
    assert choose_compute("cuda", (9, 0), triton=False, mma=True).int4_kernel == "cuda-int4pack"
    assert choose_compute("cuda", (7, 5), triton=True, mma=True).int4_kernel == "dequant"       # T4: fp16
    with pytest.raises(SwitchValueError, match="does not build here"):
        choose_compute("cuda", (9, 0), triton=True, mode="mma", mma=False)
    with pytest.raises(SwitchValueError, match="Triton"):
        choose_compute("cuda", (9, 0), triton=False, mode="mma", mma=True)
    assert [step_kernel("mma", "triton", r, 3072) for r in (1, MMA_MAX_ROWS, MMA_MAX_ROWS + 1, 64)] == \
        ["mma", "mma", "triton", "triton"]


def test_a_layer_the_mma_layout_cannot_hold_takes_the_mixed_kernels() -> None:
    from model_server.int4 import layer_kernel
    assert layer_kernel("mma", 3072, 2048, 128) == "mma"
    assert layer_kernel("mma", 3072, 2048, 32) == "cuda-int4pack"       # group below 64
    assert layer_kernel("mma", 3080, 2048, 128) == "cuda-int4pack"      # outputs not whole 16-row tiles
    assert layer_kernel("cuda-int4pack", 3080, 2048, 32) == "cuda-int4pack"


def _mma_reference(x, words, scales, group):
    """x @ dequant(W).T from the mma layout alone (unpack the nibbles, read the scale/zero bit pairs back)."""
    q = int4_mma.unpack(words)
    sc = scales.to(torch.int64) & 0xFFFFFFFF                            # [tile, group, g, 2]
    def half(v, hi):
        return ((v >> 16) if hi else v) & 0xFFFF
    t, kg = sc.shape[:2]
    out = torch.empty(kg, t * 16, 2)
    for h in (0, 1):
        for which in (0, 1):
            bits = half(sc[..., which], h).to(torch.int32) << 16
            out.view(kg, t, 2, 8, 2)[:, :, h, :, which] = bits.view(torch.float32).permute(1, 0, 2)
    return x.float() @ dequantize_groupwise(q, out, group).t()


def test_mma_layers_hold_the_layout_and_merge_by_tiles(monkeypatch) -> None:
    """Int4Linear with the mma choice (the kernel swapped for a CPU reference that reads only the mma buffers):
    its buffers unpack to the quantized values, and merged q/k/v-like parts concatenate them by whole tiles, so the
    merged module computes every part's output (a wrong dimension or order fails)."""
    from torch import nn

    from model_server.engines.fast import merged
    from model_server.int4 import ComputeChoice, Int4Linear
    reserved: list[tuple[int, int]] = []
    monkeypatch.setattr(int4_mma, "reserve", lambda dev, n, k, rows=64: reserved.append((n, k)))
    monkeypatch.setattr(int4_mma, "int4_mma_mm", lambda x, w, s, g, config=None: _mma_reference(x, w, s, g))
    choice = ComputeChoice(torch.float32, "mma", "test", rows_kernel="triton")
    torch.manual_seed(3)
    parts = []
    for n in (64, 32, 32):
        lin = nn.Linear(256, n, bias=False)
        mod = Int4Linear(lin, 64, choice)
        q, _ = quantize_groupwise(lin.weight, 64)
        assert mod.kernel == "mma" and torch.equal(int4_mma.unpack(mod.mma_words), q)
        parts.append(mod)
    x = torch.randn(5, 256)                  # past the int4pack copy's 4 rows: the mma buffers compute
    want = torch.cat([p(x) for p in parts], dim=-1)
    m = merged._merge_int4(parts)
    assert m is not None and m.mma_words.shape[0] == (64 + 32 + 32) // 16
    assert reserved == [(64, 256), (32, 256), (32, 256), (128, 256)]   # the merged layer reserves its own scratch
    assert torch.allclose(m(x), want, rtol=1e-5, atol=1e-5)
    assert parts[1].mma_words.data_ptr() == m.mma_words[4:6].data_ptr()    # parts became views of the merged rows


def test_scratch_grows_never_shrinks_and_graph_capture_cannot_grow_it() -> None:
    """The split-K scratch of one key only grows (a later, smaller reservation keeps the larger buffers; the old ones
    stay referenced for graphs captured with them), from any number of threads at once; without ``grow`` (what a
    capture asks) a scratch too small is an error that names the fix."""
    import threading
    dev, key = torch.device("cpu", 0), "test-scratch"
    try:
        big = int4_mma._scratch(dev, key, 5000, 40, grow=True)
        assert int4_mma._scratch(dev, key, 100, 1, grow=True) is big          # fits: the same buffers
        bigger = int4_mma._scratch(dev, key, 100, 80, grow=True)             # more tickets, not fewer partials
        assert bigger.part.numel() >= 5000 and bigger.tickets.numel() >= 80 and big in bigger.retired
        assert int(bigger.tickets.abs().sum()) == 0                           # tickets start at zero
        sizes = [(p, t) for p in range(1000, 20001, 1000) for t in (8, 96)]
        threads = [threading.Thread(target=int4_mma._scratch, args=(dev, key, p, t, True)) for p, t in sizes]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        final = int4_mma._scratch(dev, key, 20000, 96, grow=False)
        assert final.part.numel() >= 20000 and final.tickets.numel() >= 96
        with pytest.raises(RuntimeError, match="reserve"):
            int4_mma._scratch(dev, key, 10 ** 7, 1, grow=False)
    finally:
        int4_mma._SCRATCH.pop((0, key), None)


def test_auto_says_why_it_did_not_take_the_mma_kernel(monkeypatch) -> None:
    """On a CUDA device (faked here: CI has none) where the kernel does not build, ``auto`` takes ``mixed`` and the
    choice's reason, which /info reports as ``int4_kernel_reason``, carries the build's one-line failure."""
    from model_server import int4_choice, int4_triton
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(int4_triton, "available", lambda: True)
    monkeypatch.setattr(int4_mma, "why_not", lambda device=None: "does not build (RuntimeError: no NVRTC)")
    monkeypatch.delenv("MODEL_SERVER_INT4_KERNELS", raising=False)
    choice = int4_choice.device_compute("cuda")
    assert (choice.int4_kernel, choice.rows_kernel) == ("cuda-int4pack", "triton")
    assert choice.reason.endswith("; mma kernel does not build (RuntimeError: no NVRTC)")
    monkeypatch.setattr(int4_mma, "why_not", lambda device=None: None)
    assert int4_choice.device_compute("cuda").int4_kernel == "mma"
    monkeypatch.setenv("MODEL_SERVER_INT4_KERNELS", "tinygemm")
    assert int4_choice.device_compute("cuda").rows_kernel is None          # tinygemm never asks for the kernel


def test_the_wrapper_rejects_what_the_kernel_cannot_take_before_any_launch() -> None:
    """Wrong dtype, a layout of another K or group, a config too small for the rows: one ValueError each, raised
    before anything reaches the device (so these run on CPU); no rows is an empty result."""
    torch.manual_seed(5)
    q = torch.randint(0, 16, (32, 256), dtype=torch.uint8)
    words, scales = int4_mma.pack(q, torch.randn(2, 32, 2).to(torch.bfloat16), 128)
    x = torch.randn(3, 256).to(torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 activations"):
        int4_mma.int4_mma_mm(x.float(), words, scales, 128)
    with pytest.raises(ValueError, match="do not match"):
        int4_mma.int4_mma_mm(torch.randn(3, 192).to(torch.bfloat16), words, scales, 128)
    with pytest.raises(ValueError, match="do not match"):
        int4_mma.int4_mma_mm(x, words, scales, 64)                       # scales made for groups of 128
    with pytest.raises(ValueError, match="does not fit 9 rows"):
        int4_mma.int4_mma_mm(torch.randn(9, 256).to(torch.bfloat16), words, scales, 128,
                             int4_mma.Config(1, 1, 4, 4, 1))
    with pytest.raises(ValueError, match="does not fit"):
        int4_mma.int4_mma_mm(x, words, scales, 128, int4_mma.Config(1, 1, 4, 4, 3))   # 3 splits of 4 blocks
    assert int4_mma.int4_mma_mm(x[:0], words, scales, 128).shape == (0, 32)


def test_precompile_mma_compiles_every_config_the_layers_can_pick(monkeypatch) -> None:
    """``compile-cache fill``'s warm-up (int4_precompile.precompile_mma) asks for each configuration that steps of 1..16
    rows (1..32 on layers of >= 16,384 outputs) pick on each mma layer shape, once; layers on other kernels are skipped. (The compile itself is NVRTC's, on a
    GPU; here the request is recorded.)"""
    from torch import nn

    from model_server import int4_precompile
    from model_server.int4 import ComputeChoice, Int4Linear, mma_max_rows
    monkeypatch.setattr(int4_mma, "reserve", lambda *a, **k: None)
    monkeypatch.setattr(int4_mma, "_num_sms", lambda dev: 132)
    monkeypatch.setattr(int4_mma, "device_index", lambda dev: 0)
    asked: list[tuple[str, int]] = []
    monkeypatch.setattr(int4_mma, "kernel", lambda name, index: asked.append((name, index)))
    mma = ComputeChoice(torch.float32, "mma", "test", rows_kernel="triton")
    layers = nn.ModuleList([Int4Linear(nn.Linear(256, 2048, bias=False), 64, mma),
                            Int4Linear(nn.Linear(256, 2048, bias=False), 64, mma),     # same shape: nothing new
                            Int4Linear(nn.Linear(256, 16384, bias=False), 64, mma),
                            Int4Linear(nn.Linear(256, 64, bias=False), 64, ComputeChoice(torch.float32,
                                                                                      "cpu-int4pack", "test"))])
    n = int4_precompile.precompile_mma([layers])
    assert (mma_max_rows(2048), mma_max_rows(16384)) == (16, 32)
    want = {(int4_mma.choose_config(r, nn_, 256, 132).name(), 0) for nn_ in (2048, 16384)
            for r in range(1, mma_max_rows(nn_) + 1)}
    assert n == len(want) == len(asked) and set(asked) == want
    assert "w4a16_mma<4,1,8,4,1>" in {name for name, _ in asked}       # 32 rows on the wide layer
    assert {"w4a16_mma<1,1,4,4,1>", "w4a16_mma<2,1,8,4,1>"} <= {name for name, _ in asked}
