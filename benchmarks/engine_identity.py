"""engine_throughput.py's greedy identity: ``model.generate`` one prompt at a time vs the fast engine
with all prompts in one batch; where they differ, the step and the gap between transformers' two
best logits there (a near-tie any change of kernel or batch shape may flip), and a teacher-forced
check of every fast-engine token.

Owns: that comparison. Must NOT: time anything (it is about tokens, not speed).
"""
from __future__ import annotations

import asyncio
import copy
import random
import time

import torch

from model_server.engines.base import GenerationRequest, SamplingParams


def greedy_identity(loaded, n_prompts: int, n_new: int, max_prompt: int, device: str, seed: int) -> dict:
    """model.generate (batch 1, each prompt alone) vs the fast engine (all prompts batched together)."""
    from model_server.engines.fast import FastEngine

    model = loaded.model
    vocab = len(loaded.tokenizer)
    rng = random.Random(seed)
    lens = sorted({max(1, int(max_prompt * f)) for f in (0.02, 0.1, 0.25, 0.5, 0.75, 1.0)})
    prompts = [[rng.randrange(5, vocab) for _ in range(lens[i % len(lens)])] for i in range(n_prompts)]
    gc_ = copy.deepcopy(model.generation_config)
    gc_.eos_token_id = None
    gc_.do_sample = False
    gc_.max_new_tokens = n_new
    gc_.min_new_tokens = None
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc_, k):
            setattr(gc_, k, None)
    refs, gaps, ulps = [], [], []
    t0 = time.monotonic()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc_,
                                 return_dict_in_generate=True, output_scores=True,
                                 pad_token_id=loaded.tokenizer.pad_token_id or 0)
            refs.append(out.sequences[0, len(p):].tolist())
            g, u = [], []
            for s in out.scores:
                top = torch.topk(s[0].float(), 2).values
                g.append(float(top[0] - top[1]))
                # rounding step of the model dtype at the top logit's magnitude
                u.append(float(torch.finfo(model.dtype if model.dtype.is_floating_point else torch.bfloat16).eps
                               * max(abs(float(top[0])), 1e-6)))
            gaps.append(g)
            ulps.append(u)
    hf_seconds = time.monotonic() - t0

    async def run_fast():
        eng = FastEngine(model, [], max_batch=max(8, n_prompts), max_seq_len=max(lens) + n_new + 1)
        await eng.start()
        try:
            async def one(i, p):
                toks = []
                async for ev in eng.submit(GenerationRequest(f"id{i}", p, SamplingParams(max_new_tokens=n_new))):
                    if ev.token_id is not None:
                        toks.append(ev.token_id)
                return toks
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await eng.stop()

    fast = asyncio.run(run_fast())
    # teacher-forced: is every fast-engine token an argmax of transformers' logits for the same prefix
    # (one full forward over prompt + fast tokens), exactly or within the dtype's rounding?
    tf = {"steps": 0, "fast_token_is_hf_argmax": 0, "within_2_rounding_steps": 0, "beyond": 0,
          "largest_gap_beyond": 0.0}
    eps = torch.finfo(model.dtype if model.dtype.is_floating_point else torch.bfloat16).eps
    with torch.inference_mode():
        for p, f in zip(prompts, fast):
            if not f:
                continue
            ids = torch.tensor([p + f], device=model.device)
            lg = model(ids).logits[0, len(p) - 1: len(p) - 1 + len(f)].float()
            best = lg.max(dim=-1).values
            chosen = lg.gather(1, torch.tensor(f, device=lg.device)[:, None]).squeeze(1)
            gap = (best - chosen).tolist()
            lim = (2 * eps * best.abs()).tolist()
            for gp, lm in zip(gap, lim):
                tf["steps"] += 1
                if gp == 0:
                    tf["fast_token_is_hf_argmax"] += 1
                elif gp <= lm:
                    tf["within_2_rounding_steps"] += 1
                else:
                    tf["beyond"] += 1
                    tf["largest_gap_beyond"] = max(tf["largest_gap_beyond"], gp)
    mismatches = []
    for i, (r, f) in enumerate(zip(refs, fast)):
        if r != f:
            j = next((k for k, (a, b) in enumerate(zip(r, f)) if a != b), min(len(r), len(f)))
            gap = gaps[i][j] if j < len(gaps[i]) else None
            ulp = ulps[i][j] if j < len(ulps[i]) else None
            mismatches.append({"prompt": i, "prompt_len": len(prompts[i]), "first_diff_step": j,
                               "hf_top2_logit_gap": gap, "dtype_rounding_step_at_top_logit": ulp,
                               "near_tie": (gap is not None and ulp is not None and gap <= 2 * ulp)})
    all_gaps = [g for gs in gaps for g in gs]
    near = sum(1 for gs, us in zip(gaps, ulps) for g, u in zip(gs, us) if g <= 2 * u)
    return {"prompts": n_prompts, "new_tokens": n_new, "prompt_lens": [len(p) for p in prompts],
            "identical": n_prompts - len(mismatches), "mismatches": mismatches,
            "steps_total": len(all_gaps), "steps_with_near_tie_top2": near,
            "hf_generate_seconds": round(hf_seconds, 2), "teacher_forced": tf,
            "dtype": str(model.dtype).replace("torch.", "")}
