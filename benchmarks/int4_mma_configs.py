"""Which configurations of the CUDA W4A16 kernel benchmarks/int4_mma_bench.py tries (sweeps, twins of the default)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_server import int4_mma  # noqa: E402


def kw_twin(cfg: int4_mma.Config) -> int4_mma.Config:
    """``cfg``'s rows per CTA with 4 (2 where that would pass 16 warps) warps along K sharing each row group's tiles."""
    kw = 4 if cfg.warps * 4 <= 16 else 2
    return dataclasses.replace(cfg, warps=cfg.warps * kw, flat=1, kw=kw)


def sweep_configs(m: int, n: int, k: int, sms: int) -> list[int4_mma.Config]:
    """Tiles per warp 1/2/4 x warps 2/4/8 at 4 stages, and stages 2/3/6/8 at the default tiles, each at split K 1..16
    (>= 2 blocks per split; shared memory up to int4_mma.MAX_SMEM), each FLAT (the H100 sweep of 2026-12-05 22:29
    found FLAT never slower, so the copies without it are left out), and warps along K (KW 2 and 4, 1/2/4
    row groups of 1 or 2 tiles, split 1..8). Two warps per CTA: more CTAs without splitting K (the split's tail is what
    one row pays on the small layers). Order (a sweep's time budget may cut it): the rule's config (int4_mma.rule_config), its FLAT and KW
    twins, the KW configs, then the rest (all FLAT)."""
    nt = int4_mma.token_tiles(m)
    blocks = k // int4_mma.BLOCK_K
    base = int4_mma.rule_config(m, n, k, sms)        # the rule as served before the measured table: fixed sets
    out = [base]
    shapes = [(r, w, 4) for r in (1, 2, 4) for w in (2, 4, 8)] + [(base.r, base.warps, st) for st in (2, 3, 6, 8)]
    for r, warps, stages in shapes:
        for split in (1, 2, 4, 8, 16):
            cfg = int4_mma.Config(nt, r, warps, stages, split)
            if blocks % split or blocks // split < 2 or cfg.smem_bytes() > int4_mma.MAX_SMEM or cfg in out:
                continue
            if nt * r > 16 or cfg.grid_x(n) * split > 16 * sms:
                continue
            out.append(cfg)
    kws = [int4_mma.Config(nt, r, rw * kw, 4, split, 1, kw) for r in (1, 2) for rw in (1, 2, 4) for kw in (2, 4)
           for split in (1, 2, 4, 8)]
    kws = [c for c in kws if c.warps <= 16 and nt * c.r <= 16 and blocks % c.split == 0 and blocks // c.split >= 2
           and c.smem_bytes() <= int4_mma.MAX_SMEM and c.grid_x(n) * c.split <= 16 * sms]
    twins = [base, dataclasses.replace(base, flat=1), kw_twin(base)]
    rest = kws + [dataclasses.replace(cfg, flat=1) for cfg in out[1:]]   # FLAT only: never slower (2026-12-05 22:29)
    return twins + [c for c in rest if c not in twins]
