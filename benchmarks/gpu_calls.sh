#!/usr/bin/env bash
# The GPU measurements still open (issues 14 and 17), one device call each, in the order to run them.
# Each call: carry .gpu/.whl (rouge-score, nltk, OpenTelemetry wheels: the GPU image lacks them; NF4 also needs
# bitsandbytes 0.50.2, carried slimmed to its CUDA 13 libraries, 7 MB, since the whole wheel's 43 MB does not fit the
# device tool's 64 MiB beside the tracked tree of ~34 MB: see "Preparing .gpu/.whl" below), write under $OUT. Usage on the device machine, from the repository root:
#   bash benchmarks/gpu_calls.sh s46        # issue 17: the served stages rule (determinism 33/48/64, kernels at 64), the fence
#                                            A/B with 3 stages at 64 rows, then bf16 vs int4:mma at 64 in one process (~9 min)
#   bash benchmarks/gpu_calls.sh s46b       # issue 17: the mma and small-rows Triton kernels' repeatability, PDL on the served
#                                            stages (bits, kernels at 64), steady state at 64 with PDL (bf16, int4:mma,
#                                            int4:triton) and without (int4:mma), the decode profile at 64 (~9 min)
#   bash benchmarks/gpu_calls.sh s46c       # issue 17: today's defaults: bf16 vs int4:mma at 1/8/64 in one process, then
#                                            seeded cold starts (COLD_VARIANTS, default seeded,seeded-int4 twice) (~8 min)
#   bash benchmarks/gpu_calls.sh s46d       # issue 17: bf16 vs int4:mma at 64 in two more processes (each order), then energy per
#                                            token at 64 (EPT_CONC), bf16 and int4 (~8 min)
#   bash benchmarks/gpu_calls.sh splitsum   # issue 17, first call of the next session: split-K partials summed by their consumers
#                                            (MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER) off/on: decode profile at 64 with greedy
#                                            tokens compared, steady state at 64 int4:mma off/on/off/on, bf16 (~8 min)
#   bash benchmarks/gpu_calls.sh fuse64     # issue 17, the deciding call: split-K sums in their consumers and the GLU epilogue
#                                            together, off/on: decode profile at 64 with greedy tokens compared (and the served
#                                            rotary + K/V kernel against separate ops), then the 64-stream ratio with both on
#                                            (int4 first, bf16 first) and INT4 with both off (~8.5 min)
#   bash benchmarks/gpu_calls.sh wave       # issue 17: where the 64-stream wave's stall goes with both INT4 cuts on: step traces
#                                            of int4 and bf16 at 64 streams (step_trace.py, TRACE_S 1.0), then prefill bursts
#                                            of 1-64 prompts, bf16 and int4:mma, with a profile of the 64 (~5 min)
#   bash benchmarks/gpu_calls.sh burst2     # issue 17: the 64-prompt prefill burst: bursts of 32/64 with kernel and host profiles,
#                                            int4:mma and bf16 (b/), the same graphed to 4,096 tokens (b_g4096/), steady state
#                                            at 64 graphed to 4,096 (ss_g4096/), the 64 in passes of <= 2,048 (b_p2048/) (~6.5 min)
#   bash benchmarks/gpu_calls.sh int4pack   # issue 17: the mma mode's int4pack copy for steps of <= 4 rows on narrow layers:
#                                            per-linear times at 1/2/4/8 rows (tinygemm vs mma), then bf16 vs int4:mma at
#                                            1/8/64 in one process (copy on, the default), then int4:mma at 1/8 with
#                                            MODEL_SERVER_INT4_MMA_INT4PACK_ROWS=0 (IP_AB=0 skips it) (~9 min)
#   bash benchmarks/gpu_calls.sh mmaglu     # issue 17: the mma kernel's GLU epilogue (MODEL_SERVER_INT4_MMA_GLU): first-use
#                                            check, bits and device time per row count on the merged gate/up, then bf16 vs
#                                            int4:mma at GL_CONC (1) with it, int4:mma without it (next process) (~4 min)
#   bash benchmarks/gpu_calls.sh paired     # issue 17: the Triton GEMM reading (scale, zero) as one 32-bit word per group and
#                                            column: bits and hot / cold time per linear at 16-256 rows, then the steady
#                                            state at 64 with it (int4:mma, bf16) and without it (int4:mma) (~6 min)
#   bash benchmarks/gpu_calls.sh lmhead     # issue 17: the LM head's mma configuration at few rows (never swept before):
#                                            bf16 vs int4:mma at 1/8 with the shipped table, the LM head's sweep at 1/8
#                                            rows written into this checkout's table, int4:mma at 1/8 with it (~8 min)
#   bash benchmarks/gpu_calls.sh compiledops # issue 17: the engine's dynamic-shape compiled elementwise ops against static
#                                            compiles: the prefill rotary (rope_layout.py, 64 x 64 and 16 x 256) and
#                                            add + RMSNorm (also of 4 / 8 split-K partials), RMSNorm, SiLU-mul at 1 / 64 /
#                                            4,096 rows, compiled dynamic, static and rows-only dynamic (compiled_ops_static.py)
#                                            (~2 min)
#   bash benchmarks/gpu_calls.sh prope      # issue 17: a prefill's rotary as one Triton kernel (MODEL_SERVER_FAST_PREFILL_ROPE
#                                            =triton) against the compiled op: bits and time alone (rope_layout.py), bursts
#                                            of 64 prompts each way (bf16, int4:mma), the steady state at 64 each way (~8 min)
#   bash benchmarks/gpu_calls.sh norms      # issue 17: the residual add + RMSNorm as one Triton kernel (MODEL_SERVER_FAST_NORM=
#                                            triton) against the compiled ops: time and bits alone at 64 / 4,096 rows and
#                                            4 / 8 partials (compiled_ops_static.py), the INT4 decode profile at 64 each way
#                                            (greedy tokens compared), the steady state at NM_CONC (64) each way (~8-10 min)
#   bash benchmarks/gpu_calls.sh shapes     # issue 17: the fused ops compiled static with only the step's rows marked dynamic
#                                            (MODEL_SERVER_FAST_COMPILE_SHAPES=rows) against all-dynamic: the INT4 decode
#                                            profile at 64 each way (greedy tokens compared), the steady state at SH_CONC (64)
#                                            each way (~7-8 min; run compiledops first for the ops alone)
#   bash benchmarks/gpu_calls.sh gemlite    # issue 17: GemLite's A16W4 Triton kernels (a maintained library, carried as a wheel)
#                                            against our INT4 Triton GEMM and bf16 on the 1B shapes at 1-64 rows, same
#                                            weights: time per call and per step's linears, errors (gemlite_probe.py) (~3-7 min)
#   bash benchmarks/gpu_calls.sh normshapes # issue 17: MODEL_SERVER_FAST_COMPILE_SHAPES=rows and MODEL_SERVER_FAST_NORM=triton
#                                            together against the defaults: steady state at 64 each way (NS_ORDER on,off),
#                                            the INT4 decode profile at 64 each way with greedy tokens compared (~7 min)
#   bash benchmarks/gpu_calls.sh graph4096  # issue 17: greedy tokens with the 64-prompt prefill graphed vs eager, then the
#                                            64-stream steady state with prefill graphs to 4,096 and to 2,048 (~5.5 min)
#   bash benchmarks/gpu_calls.sh glu        # issue 17: the GLU epilogue (MODEL_SERVER_INT4_GLU_EPILOGUE): its bits and time per
#                                            row count (int4_glu_check.py), decode profile at 64 off/on with greedy tokens
#                                            compared, steady state at 64 int4:mma off/on/off/on (GLU_SS=1: with the split
#                                            sums in their consumers in every arm) (~8 min)
#   bash benchmarks/gpu_calls.sh pdlab      # issue 17: PDL's A/B at 64 streams on one machine, alternated off/on/off/on, then bf16
#                                            (the control machine C of 2026-12-06 lacked) (~6 min)
#   bash benchmarks/gpu_calls.sh energy     # issue 17: energy validation checks 1 and 3, three runs (~6 min; EV_RUNS="1" for one)
#   bash benchmarks/gpu_calls.sh grid       # issue 14: the GPU grid, resumable (repeat until 12/12; ~9 min a call)
#   GRID=benchmarks/grids/gpu-qwen-rag.yaml GRID_DIR=out/qrag bash benchmarks/gpu_calls.sh grid   # another grid
#   QUANTS=bf16,int4 bash benchmarks/gpu_calls.sh ept; QUANTS=nf4 bash ...  # issue 17: energy per token at
#                                            1/8/64/256, ledger vs counter (~3.5 min per quantization);
#                                            PROXIES=2 EPT_CONC=8,64 QUANTS=bf16: two proxies sharing NVML, summed
#                                            EPT_API_WORKERS=4: the model server's HTTP in 4 worker processes
#   bash benchmarks/gpu_calls.sh load       # issues 17/19: the proxy at 1,000 streams on the GPU machine's CPUs,
#                                            one vs two proxy processes (--energy-shared), pinned (~4 min; no GPU use;
#                                            LOAD_SOURCES=none,replay,replay-x3,replay-x4 for more processes)
#   bash benchmarks/gpu_calls.sh kernels    # issue 17: INT4 kernels (tinygemm, Triton, bf16 cuBLAS) per shape (~2 min)
#   bash benchmarks/gpu_calls.sh kernels2   # issue 17: INT4 kernels per merged shape at M=1,8,64,16 with the sweeps of the
#                                            small-rows kernel's and the GEMM's configs, errors checked (~6 min; no wheels
#                                            needed). K2_CONFIRM=1: no sweep, then the steady state in-process bf16 vs int4 with
#                                            MODEL_SERVER_INT4_KERNELS=triton at 1/8/64 (SS_QUANTS, SS_CONC), 6 s windows (~5 min)
#   bash benchmarks/gpu_calls.sh http       # issue 17: bf16 at 64 in-process and over HTTP, the server's switch
#                                            interval 5 ms (Python's default) vs 0.5 ms, in the order SWITCHES gives (~5 min)
#   bash benchmarks/gpu_calls.sh httpw      # issue 17: bf16 at 64 and 256 in-process vs HTTP, serve --api-workers 0
#                                            (HTTP in the engine's process) vs 4 (WORKERS, HTTPW_CONC change the sets; WINDOW_S, default 10;
#                                            SWITCHES="default 0.005": one run per server switch interval) (~6 min)
#   bash benchmarks/gpu_calls.sh httpo      # issue 17: bf16 at 64 in-process vs HTTP (--api-workers 2), the fast engine's
#                                            prefill overlap off then on (OVERLAPS="0 1"; WORKERS, HTTPW_CONC as httpw) (~6 min)
#   bash benchmarks/gpu_calls.sh httpm      # issue 17: prompts prefilled inside decode steps: step costs and greedy
#                                            agreement (mixed_step.py), then bf16 at 64 in-process vs HTTP (--api-workers 4)
#                                            per MIXEDS="0 4" (segments[:min segments], MODEL_SERVER_FAST_MIXED_SEGMENTS
#                                            and _MIN_SEGMENTS; HTTPW_CONC, WORKERS) (~2 min each, plus ~1.5 min)
#   bash benchmarks/gpu_calls.sh ropekv     # issue 17: decode's rotary + K/V cache writes as one Triton kernel: decode
#                                            profile off/on (DP_QUANTS bf16,int4), then bf16 steady state at SS_CONC 1,64 (~6 min)
#   bash benchmarks/gpu_calls.sh gemv       # issue 17: a Triton GEMV vs cuBLAS per decode projection at 1-8 rows
#                                            (gemv_probe.py; GEMV_ROWS, GEMV_SHAPES; not yet run) (~5 min)
#   bash benchmarks/gpu_calls.sh trace      # issue 17: where a steady in-process run's device time goes (step_trace.py: device
#                                            busy, idle gaps, kernels per step) for TRACE_QUANTS (bf16) at TRACE_STREAMS (64, 1),
#                                            MODEL_SERVER_FAST_DECODE_ATTN per TRACE_ATTN (0) (~1 min each)
#   bash benchmarks/gpu_calls.sh next       # issue 17, the first call of the next session (~7 min): decode profile (bf16, SDPA vs
#                                            the Triton decode attention: ITL at 1 with the greedy pick in the graph and the host
#                                            changes, kernels, errors), traces at 64 (SDPA, Triton), then the bf16 steady state at 1 and
#                                            64 with MODEL_SERVER_FAST_DECODE_ATTN=0 and =1
#   bash benchmarks/gpu_calls.sh attnlong   # issue 17: SDPA vs the Triton decode attention at a long context (1,024-token prompts,
#                                            ATTN_PROMPT), batches 1, 8, 64: kernels, graph time, ITL at 1, errors (~3 min)
#   bash benchmarks/gpu_calls.sh agree      # issue 17: INT4 and NF4 greedy agreement with bf16 on a small trained model, with the
#                                            GPU kernels (quant_agreement.py --device cuda; seeds AGREE_SEEDS, default 0 1 2;
#                                            AGREE_QUANTS, default bf16,int4,int4-head16,nf4: nf4 needs the bitsandbytes wheel) (~2 min)
#   bash benchmarks/gpu_calls.sh ctax       # issue 17: C_tax and keep-warm break-even under the proxy's --spawn,
#                                            fp16 and int4 (CTAX_VARIANTS), to first token and to engine warm (~5 min)
#   bash benchmarks/gpu_calls.sh int4       # issue 17: INT4 kernels per merged shape (no sweep), then the steady state
#                                            in-process, bf16 vs int4 (the mixed dispatch: int4.tinygemm_max_rows) at 1/8/64/256
#                                            (SS_QUANTS, SS_CONC change the set; INT4_KERNELS=0 skips the per-shape part) (~9 min)
#   bash benchmarks/gpu_calls.sh cold       # issue 17: spawn to first token, before vs after (direct load, background
#                                            warm-up), bf16 and int4, fills the compile cache first (~5 min);
#                                            COLD_VARIANTS picks them (after-tf*: transformers' build vs after*: native;
#                                            seeded*: an empty cache + a seed from `model-server compile-cache fill`, the
#                                            image's first start: COLD_VARIANTS=fill-cache,after,seeded,seeded-int4,after-empty-cache;
#                                            *-nodefer*: the background compile from the first prefill, as before 2026-12-05 14:00:
#                                            COLD_VARIANTS=seeded-nodefer,seeded,seeded-nodefer-int4,seeded-int4 for the first request's A/B);
#                                            COLD_ARGS adds options (--importtime: the top imports per start in the table);
#                                            the early driver init's A/B: COLD_ARGS=--importtime COLD_VARIANTS=seeded,
#                                            seeded-earlycuda,seeded-int4,seeded-earlycuda-int4 (imports split in to_listening,
#                                            to_torch, torch_to_device (cuInit), device_to_load); torch's bytecode cache
#                                            A/B: COLD_VARIANTS=seeded-nobytecode,seeded,seeded-nobytecode-int4,seeded-int4;
#                                            $OUT gets card.txt, cold.log and cold/ (JSON, table, cold_logs.tgz)
#                                            the two compile switches' A/B: COLD_VARIANTS=seeded,seeded-dynops,
#                                            seeded-int4,seeded-dynops-int4 (the defaults before 2026-12-07, a seed of
#                                            their own); COLD_TIMEOUT (560)
#                                            one switch alone: seeded-rowsonly, seeded-normonly (-int4)
#   bash benchmarks/gpu_calls.sh readw      # issue 17: safetensors load_file vs the staged reader onto the GPU, 1B preset,
#                                            5 reps each, tensors compared (read_weights.py; ~1 min). Then the cold start
#                                            with it: COLD_VARIANTS=seeded,seeded-staged,seeded-int4,seeded-staged-int4
#   bash benchmarks/gpu_calls.sh imports    # issue 17: `import torch` in fresh interpreters (the cold start's largest phase):
#                                            as installed, plus the driver's init, with a PYTHONPYCACHEPREFIX cache; the
#                                            torch tree's .pyc facts, -X importtime's top self times (import_torch.py; ~1 min)
#   bash benchmarks/gpu_calls.sh gptq       # issue 17: GPTQ checkpoints on the int4 kernels (the fast engine's repack): steady
#                                            state in-process, bf16 vs int4 vs GPTQ-format copies (bf16 LM head; gptq-act with
#                                            act order) at 1/8/64 (SS_QUANTS, SS_CONC change the set; 10 s windows) (~9 min)
#   bash benchmarks/gpu_calls.sh mma        # issue 17: the CUDA W4A16 kernel (int4_mma.py, NVRTC) per merged shape and the LM
#                                            head at MMA_MS (1,8,16,32,64) against bf16, tinygemm and the Triton GEMM, and its
#                                            FLAT and KW variants (smoke-checked first), with a sweep of its configs
#                                            (MMA_BUDGET s, default 300; keep it <= 200 in a 580 s call; --no-sweep: MMA_SWEEP=0); torch
#                                            only (~6 min). MMA_SS=1: then steady_state.py in-process, SS_QUANTS (bf16,int4:mma)
#                                            at SS_CONC (1,8,64), needs the wheels (~6 min more); MMA_SS_RULE=1: then int4:mma
#                                            again with MODEL_SERVER_INT4_MMA_CONFIGS=rule (the configs before the measured table);
#                                            MMA_SS_B='VAR=value ...': then int4:mma again with those settings (into ss_b/)
#   bash benchmarks/gpu_calls.sh mmaprof    # issue 17: Nsight Compute on the mma kernel per shape at MMA_MS rows (64), at its
#                                            default config, its FLAT and KW twins and twice the split: where its cycles go (stall
#                                            reasons, issue, executed instructions, memory, occupancy); about 30 s (H100, 2026-12-06)
#   bash benchmarks/gpu_calls.sh gemvcu     # issue 17: the CUDA one-row bf16 GEMV (gemv_bf16.py) against cuBLAS per decode shape
#                                            (gemv_bf16_bench.py), then the steady state in-process, bf16 at SS_CONC (1) with
#                                            the GEMV (the default since 2026-12-06; ss_gemv/) and MODEL_SERVER_FAST_GEMV=0 (ss/) (~4 min)
#   bash benchmarks/gpu_calls.sh gemvrows   # issue 17: the bf16 GEMV at 1/2/4/8 rows of x (one weight read for all rows) against
#                                            cuBLAS per decode shape, every configuration per row count (gemv_bf16_bench.py
#                                            --rows), then the steady state in-process, bf16 at SS_CONC (2,4,8) with
#                                            MODEL_SERVER_FAST_GEMV_ROWS=8 (ss_rows8/) and then without (one row, ss/) (~8 min)
#   bash benchmarks/gpu_calls.sh decode     # issue 17: decode-step profile, merged projections off/on, then the
#                                            steady state in-process (bf16, int4 at 1/8/64; SS_ARGS adds options) (~8 min)
#   bash benchmarks/gpu_calls.sh pick       # issue 17: the greedy pick as two Triton kernels vs the eager ops: decode-step
#                                            profile (served defaults vs pick-eager, bf16 and int4 at 1 and 64 rows), then the
#                                            steady state in-process with the kernels (ss/) and without (ss_eager/),
#                                            SS_QUANTS (bf16,int4:mma) at SS_CONC (1,64) (~7 min)
#   bash benchmarks/gpu_calls.sh splitk     # issue 17: the Triton GEMM's split K summed by each tile's last program (ticket)
#                                            vs a second kernel: per linear at 16/32/64 rows in CUDA graphs and a check at
#                                            1-64 rows (int4_splitk_bench.py, ~2 min), then the steady state in-process,
#                                            SS_QUANTS (int4:mma: the Triton GEMM above 16/32 rows) at SS_CONC (64,32) with
#                                            MODEL_SERVER_INT4_TRITON_SPLIT_REDUCE=ticket (ss_ticket/) then =kernel
#                                            (ss_kernel/); SS_SECONDS (170) per arm (~8 min)
#   bash benchmarks/gpu_calls.sh sweep64    # issue 17: the Triton GEMM's wide grid at 32/64 rows with the served dequantization
#                                            (one FMA, PTX unpack): int4_kernels.py --wide-sweep (sweep64/; ~6 min): does
#                                            another split K or tile serve q/k/v, o and down better now?
#   bash benchmarks/gpu_calls.sh fence      # issue 17: does the async-proxy fence (MODEL_SERVER_INT4_TRITON_FENCE=1) make 3
#                                            pipeline stages deterministic? int4_pdl_check.py at 48/64 rows, 3 stages,
#                                            splits 1/2/8, without (chk_nofence/) and with it (chk_fence/), then the kernel
#                                            times at 64 rows with 3 stages and the fence (k_fence/) (~3 min)
#   bash benchmarks/gpu_calls.sh served     # issue 17: the served stages rule (never 3 at 33-64 rows): determinism check at
#                                            33/48/64 rows (chk/), kernel times at 64 (k/), steady state int4:mma at 64 (ss/)
#   bash benchmarks/gpu_calls.sh stages     # issue 17: the GEMM's pipeline stages above 32 rows (MODEL_SERVER_INT4_TRITON_STAGES):
#                                            served configurations at 48/64/128/256 rows, per stage count 3/2/4 the
#                                            determinism check (int4_pdl_check.py --splits 1, PDL off; chk_N/) and the
#                                            kernel times (int4_kernels.py --no-sweep; k_N/), then the steady state at 64
#                                            streams, int4:mma with STAGES_SS (2) (ss/) (~6 min)
#   bash benchmarks/gpu_calls.sh splitdiag  # issue 17: split-K configurations of more programs than the SMs hold at once gave
#                                            unstable results at 64 rows (final's pdl/): int4_pdl_check.py with PDL off on
#                                            gate/up and the LM head at 48/64 rows, split 2/8, the sum kernel vs the ticket
#                                            and 2/3/4 pipeline stages, eager and graph errors apart (diag/) (~3 min)
#   bash benchmarks/gpu_calls.sh final      # issue 17: int4_pdl_check.py (PDL on vs off: the same bits? pdl/), then the
#                                            steady state in-process with the served defaults, bf16 and int4:mma at
#                                            SS_CONC (1,8,64) in one process (ss/) (~7 min)
#   bash benchmarks/gpu_calls.sh burst      # issue 17: bursts of 1/8/32/64 prompts prefilled together (prefill_burst.py):
#                                            bf16 and int4:mma with a profile of the 64-prompt burst (b/), int4:mma with
#                                            MODEL_SERVER_INT4_PREFILL_DEQUANT_ROWS=0 (b_fused/), then the Triton GEMM's wide
#                                            grid at 64 rows (sw64/, SW_BUDGET 200 s) (~7 min)
#   bash benchmarks/gpu_calls.sh pdl        # issue 17: the Triton GEMM and its split-K sum as programmatic dependent launches
#                                            (MODEL_SERVER_INT4_TRITON_PDL): int4_kernels.py --no-sweep at 16/32/64 rows off
#                                            (k_off/) and on (k_pdl/), then the steady state in-process at SS_CONC (64):
#                                            int4:mma on (ss_pdl/), off (ss/), bf16 (ss_bf16/); SS_SECONDS (90) per arm (~6 min)
#   bash benchmarks/gpu_calls.sh prefill    # issue 17: prefill-sized INT4 steps: int4_kernels.py --no-sweep --no-lm-head at
#                                            PF_MS (64,256,512,1024,2048) rows, bf16 / the fused GEMM / dequantize then
#                                            cuBLAS (int4_dequant) (k_pf/), the fused GEMM with fma-ptx (k_pfptx/), then the
#                                            steady state in-process at SS_CONC (64): int4:mma with the served bound
#                                            (ss_deq/), with MODEL_SERVER_INT4_PREFILL_DEQUANT_ROWS=0 (ss_fused/), bf16
#                                            (ss_bf16/); SS_SECONDS (90) per arm (~7 min)
#   bash benchmarks/gpu_calls.sh deqptx     # issue 17: MODEL_SERVER_INT4_TRITON_DEQ=fma-ptx (the nibbles unpacked by inline
#                                            PTX): int4_kernels.py --no-sweep at 32/64 rows (k_ptx/), then the steady
#                                            state in-process at SS_CONC (32,64): int4:mma with fma-ptx (ss_ptx/), bf16
#                                            (ss_bf16/), then int4:mma with fma at 64 (ss_fma/) (~6 min)
#   bash benchmarks/gpu_calls.sh l2pf       # issue 17: the next INT4 linear's weights prefetched into L2: 16 layers' linears
#                                            per step in a CUDA graph, off / inline / side / hot / bf16 at 1-64 rows
#                                            (int4_l2_prefetch.py, ~1 min), then the steady state in-process, int4:mma at
#                                            SS_CONC (1,8,64) with MODEL_SERVER_INT4_L2_PREFETCH=L2PF_ARM (side) (ss_pf/) and
#                                            off (ss/), then bf16 (ss_bf16/) (~8 min)
#   bash benchmarks/gpu_calls.sh deq        # issue 17: the Triton GEMM dequantizing with one bf16 FMA per weight against fp32:
#                                            int4_kernels.py --no-sweep at 16/32/64 rows with MODEL_SERVER_INT4_TRITON_DEQ=
#                                            fp32 (k_fp32/) and fma (k_fma/), then the steady state in-process, int4:mma
#                                            at SS_CONC (32,64) with fma (ss_fma/), fp32 (ss/), then bf16 (ss_bf16/) (~7 min)
# Preparing .gpu/.whl (here, with a network; .gpu/ is in .git/info/exclude): bash scripts/gpu_wheels.sh. It slims the
# bitsandbytes wheel to the libraries a CUDA 13 torch loads (7 MB of 43), so that NF4 travels beside the tree.
# The grid keeps its state in out/grid (ignored): a later call on the same warm machine resumes it;
# on a fresh machine it restarts the missing variants (finished ones come back with $OUT/grid.tgz).
set -u
case "${1:-}" in energy|grid|ept|load|kernels|kernels2|int4|decode|http|httpw|httpo|httpm|ropekv|gemv|trace|next|attnlong|agree|gptq|cold|ctax|readw|imports|mma|mmaprof|pick|gemvcu|gemvrows|splitk|l2pf|deq|deqptx|sweep64|prefill|pdl|burst|final|splitdiag|stages|served|fence|s46|s46b|s46c|s46d|splitsum|pdlab|glu|fuse64|wave|burst2|graph4096|int4pack|lmhead|compiledops|prope|norms|shapes|gemlite|normshapes|mmaglu|paired) ;; *) echo "usage: bash benchmarks/gpu_calls.sh energy|grid|ept|load|kernels|kernels2|int4|decode|http|httpw|httpo|httpm|ropekv|gemv|trace|next|attnlong|agree|gptq|cold|ctax|readw|imports|mma|mmaprof|pick|gemvcu|gemvrows|splitk|l2pf|deq|deqptx|sweep64|prefill|pdl|burst|final|splitdiag|stages|served|fence|s46|s46b|s46c|s46d|splitsum|pdlab|glu|fuse64|wave|burst2|graph4096|int4pack|lmhead|compiledops|prope|norms|shapes|gemlite|normshapes|mmaglu|paired" >&2; exit 2 ;; esac
# the kernel benchmarks need torch and Triton only (kernels2 from a bare `git archive` checkout without .gpu/)
if [ "$1" != kernels ] && [ "$1" != gemv ] && [ "$1" != mmaprof ] && { [ "$1" != mma ] || [ "${MMA_SS:-0}" = 1 ]; } && { [ "$1" != kernels2 ] || [ "${K2_CONFIRM:-0}" = 1 ]; }; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/.whl/*.whl || exit 2
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MODEL_SERVER_FAST_LAZY_GRAPHS=1
export EDGE_EVAL_COMMIT=${EDGE_EVAL_COMMIT:-unknown}
out=${OUT:?set OUT}; mkdir -p "$out" out
# The device tool brings back at most 8 files from $OUT (2 folders down): past that, everything goes into one
# $OUT/all.tgz (its logs stay beside it while they fit), so no result is lost to the count (issue 17: two calls lost
# their steady-state JSONs that way)
bundle_out() {
  local n; n=$(find "$out" -type f | wc -l)
  [ "$n" -le 8 ] && return 0
  tar czf /tmp/gpu_calls_all.tgz -C "$out" . && rm -rf "${out:?}"/* && mv /tmp/gpu_calls_all.tgz "$out/all.tgz"
  tar xzf "$out/all.tgz" -C "$out" --wildcards --no-anchored '*.log' 2>/dev/null
  while [ "$(find "$out" -type f | wc -l)" -gt 8 ]; do find "$out" -type f -name '*.log' | sort | tail -1 | xargs rm -f; done
  echo "gpu_calls: $n files in \$OUT, bundled into all.tgz"
}
trap bundle_out EXIT
trap 'exit 143' TERM INT
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > "$out/card.txt"; date -u >> "$out/card.txt"
stop_servers() { sleep 3; pkill -f "[m]odel_server serve"; pkill -f "[e]dge_proxy serve"; true; }
# ss_arm DIR SECONDS QUANTS CONC: one steady-state process in-process (steady_state.py) into $out/DIR, its cells shown
ss_arm() {
  timeout "$2" python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/$1" \
    --quants "$3" --concurrency "$4" --http-concurrency '' > "$out/$1.log" 2>&1
  echo "steady_state ($1) rc $?"; grep -E "tok/s \[|graph b1|Error" "$out/$1.log"
}
# dp_greedy_ab SWITCH...: the INT4 decode profile at 64 rows (served variant) with every SWITCH=0 into $out/dp0, then
# every SWITCH=1 into $out/dp1, and whether the greedy tokens of 64 concurrent requests are the same both ways.
# DP0_VARIANTS=rope-kv-off,served (DP0_TIMEOUT=120): the first process also runs decode's rotary + K/V writes as
# separate ops, and says whether the served rotary + K/V kernel gives their tokens
dp_greedy_ab() {
  local a s sw v t
  for a in 0 1; do
    sw=(); for s in "$@"; do sw+=("$s=$a"); done
    v=served; t=90; [ "$a" = 0 ] && v=${DP0_VARIANTS:-served} && t=${DP0_TIMEOUT:-90}
    env "${sw[@]}" timeout "$t" python3 benchmarks/decode_profile.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" \
      --out "$out/dp$a" --quants int4 --batches 64 --variants "$v" --batch-greedy 64 > "$out/dp$a.log" 2>&1
    echo "decode_profile (${sw[*]}, $v) rc $?"; tail -1 "$out/dp$a.log"
  done
  python3 benchmarks/dp_greedy_compare.py "$out/dp0/decode_profile.json" "$out/dp1/decode_profile.json"
}
case "${1:-}" in
  energy)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    for i in ${EV_RUNS:-1 2 3}; do
      timeout 170 python3 benchmarks/energy_validation.py --model-dir /tmp/m1b --only 1,3 --out "out/ev$i" \
        > "out/ev$i.log" 2>&1; echo "run $i rc $?"; stop_servers
    done
    tar czf "$out/energy_validation.tgz" out/ev[0-9]*   # $OUT brings back a few files only
    cat out/ev*/energy_validation.md ;;
  ept)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    q=${QUANTS:-bf16,int4}; d=out/ept_${q//,/_}
    timeout -s INT "${EPT_SECONDS:-560}" python3 benchmarks/energy_per_token.py --model-dir /tmp/m1b --device cuda \
      --energy-source nvml --quantizations "$q" --concurrency "${EPT_CONC:-1,8,64,256}" --seconds 10 --reps 3 \
      --proxies "${PROXIES:-1}" --api-workers "${EPT_API_WORKERS:-0}" --out "$d" \
      > "$d.log" 2>&1; echo "ept rc $?"; stop_servers
    tar czf "$out/ept.tgz" "$d" "$d.log"; cat "$d/energy_per_token.md" ;;
  load)
    timeout 420 python3 benchmarks/energy_load.py --concurrency 1000 --seconds "${LOAD_SECONDS:-30}" --rounds 3 --pin \
      --sources "${LOAD_SOURCES:-none,replay,none-x2,replay-x2}" --json "$out/energy_load_1000_x2.json" > "$out/energy_load_1000_x2.md" \
      2> "$out/energy_load.err"; echo "load rc $?"; nproc >> "$out/card.txt"; cat "$out/energy_load_1000_x2.md" ;;
  kernels)
    timeout 300 python3 benchmarks/int4_kernels.py --out "$out/kernels" > "$out/kernels.log" 2>&1; echo "kernels rc $?"
    cat "$out/kernels.log" | tail -80 ;;
  kernels2)
    if [ "${K2_CONFIRM:-0}" = 1 ]; then
      timeout 120 python3 benchmarks/int4_kernels.py --no-sweep --ms 1,8,16,64 --methods tinygemm,triton,gemv --reps 30 \
        --out "$out/kernels2" > "$out/kernels2.log" 2>&1; echo "kernels rc $?"; grep -A9 "Whole step" "$out/kernels2.log"
      [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
      timeout "${K2_SS_SECONDS:-270}" python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" \
        --out "$out/ss" --quants "${SS_QUANTS:-bf16,int4:triton}" --concurrency "${SS_CONC:-1,8,64}" --http-concurrency '' \
        --window-s 6 --agree-prompts 0 > "$out/steady_state.log" 2>&1
      echo "steady_state rc $?"; tail -12 "$out/steady_state.log"
    else
      timeout "${K2_SECONDS:-370}" python3 benchmarks/int4_kernels.py --ms 1,8,64,16 --methods tinygemm,triton,gemv \
        --reps 30 --sweep-reps 10 --sweep-budget-s "${K2_BUDGET:-300}" --out "$out/kernels2" > "$out/kernels2.log" 2>&1
      echo "kernels2 rc $?"; grep -B2 -A9 "Whole step" "$out/kernels2.log"
    fi ;;
  gptq)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    timeout 580 python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/ss_gptq" \
      --quants "${SS_QUANTS:-bf16,int4,gptq,gptq-act}" --concurrency "${SS_CONC:-1,8,64}" --http-concurrency '' \
      > "$out/steady_state.log" 2>&1
    echo "steady_state rc $?"; tail -12 "$out/steady_state.log" ;;
  int4)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    if [ "${INT4_KERNELS:-1}" = 1 ]; then   # INT4_KERNELS=0: the steady state only
      timeout 150 python3 benchmarks/int4_kernels.py --no-sweep --ms 1,8,9,16,64,256 --reps 30 --out "$out/kernels" \
        > "$out/kernels.log" 2>&1; echo "kernels rc $?"; grep -A12 "Whole model" "$out/kernels.log"
    fi
    timeout "${SS_SECONDS:-400}" python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/ss" \
      --quants "${SS_QUANTS:-bf16,int4}" --concurrency "${SS_CONC:-1,8,64,256}" --http-concurrency '' \
      > "$out/steady_state.log" 2>&1
    echo "steady_state rc $?"; tail -16 "$out/steady_state.log" ;;
  gemvcu)
    timeout 100 python3 benchmarks/gemv_bf16_bench.py --out "$out/gemv" --commit "$EDGE_EVAL_COMMIT" > "$out/gemv.log" 2>&1
    echo "gemv_bf16_bench rc $?"; cat "$out/gemv.log"
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    for arm in ss_gemv:1 ss:0; do
      d=${arm%%:*}
      if [ "${arm#*:}" = 1 ]; then unset MODEL_SERVER_FAST_GEMV; else export MODEL_SERVER_FAST_GEMV=0; fi
      timeout "${SS_SECONDS:-110}" python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" \
        --out "$out/$d" --quants bf16 --concurrency "${SS_CONC:-1}" --http-concurrency '' > "$out/$d.log" 2>&1
      echo "steady_state ($d) rc $?"; grep -E "tok/s \[|graph b1|WARN|GEMV" "$out/$d.log"
    done; unset MODEL_SERVER_FAST_GEMV ;;
  gemvrows)
    timeout 200 python3 benchmarks/gemv_bf16_bench.py --rows 1,2,4,8 --out "$out/gemv" --commit "$EDGE_EVAL_COMMIT" \
      > "$out/gemv.log" 2>&1
    echo "gemv_bf16_bench rc $?"; grep -v "^[0-9] x " "$out/gemv.log"; grep -E "^[0-9] x " "$out/gemv.log" | cut -c1-230
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    for arm in ss_rows8:8 ss:1; do     # consecutive processes: the multi-row GEMV first, then the default (one row)
      d=${arm%%:*}
      if [ "${arm#*:}" = 1 ]; then unset MODEL_SERVER_FAST_GEMV_ROWS; else export MODEL_SERVER_FAST_GEMV_ROWS=${arm#*:}; fi
      timeout "${SS_SECONDS:-150}" python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" \
        --out "$out/$d" --quants bf16 --concurrency "${SS_CONC:-2,4,8}" --http-concurrency '' > "$out/$d.log" 2>&1
      echo "steady_state ($d) rc $?"; grep -E "tok/s \[|graph b1|WARN|GEMV" "$out/$d.log"
    done; unset MODEL_SERVER_FAST_GEMV_ROWS ;;
  sweep64)
    timeout 420 python3 benchmarks/int4_kernels.py --ms 32,64 --sweep-ms 32,64 --sweep-kernels triton --wide-sweep \
      --methods bf16,triton --sweep-budget-s 330 --reps 30 --out "$out/sweep64" > "$out/sweep64.log" 2>&1
    echo "int4_kernels rc $?"; grep -E "sweep:|rel.err" "$out/sweep64.log" | cut -c1-250 ;;
  fence)
    for arm in nofence:0 fence:1; do
      MODEL_SERVER_INT4_TRITON_FENCE=${arm#*:} MODEL_SERVER_INT4_TRITON_STAGES=3 timeout 100 python3 \
        benchmarks/int4_pdl_check.py --pdl 0 --ms 48,64 --splits 1,2,8 --reps 8 --out "$out/chk_${arm%:*}" \
        > "$out/chk_${arm%:*}.log" 2>&1; echo "int4_pdl_check (${arm%:*}) rc $?"; tail -1 "$out/chk_${arm%:*}.log"
      grep '"eager_same": false' "$out/chk_${arm%:*}.log" | cut -c1-160
    done
    MODEL_SERVER_INT4_TRITON_FENCE=1 MODEL_SERVER_INT4_TRITON_STAGES=3 timeout 60 python3 benchmarks/int4_kernels.py \
      --ms 64 --no-sweep --methods bf16,triton --out "$out/k_fence" > "$out/k_fence.log" 2>&1
    echo "int4_kernels rc $?"; sed -n '/^Whole step/,$p' "$out/k_fence.log" | sed -n 5p ;;
  pdlab)  # PDL's same-machine A/B at 64 streams, alternated: int4:mma with MODEL_SERVER_INT4_TRITON_PDL 0, 1, 0, 1, then bf16 (~6 min)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    for arm in off1:0 on1:1 off2:0 on2:1; do
      MODEL_SERVER_INT4_TRITON_PDL=${arm#*:} ss_arm "ss_pdl_${arm%:*}" 75 int4:mma 64
    done
    ss_arm ss_bf16 75 bf16 64 ;;
  splitsum)  # split-K partials summed by their consumers (MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER) off/on: decode profile
    #          at 64 rows with greedy tokens compared, then steady state at 64: int4:mma off, on, off, on, bf16 (~8 min)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    dp_greedy_ab MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER
    for arm in off1:0 on1:1 off2:0 on2:1; do
      MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER=${arm#*:} ss_arm "ss_${arm%:*}" 75 int4:mma 64
    done
    ss_arm ss_bf16 75 bf16 64 ;;
  glu)  # the GLU epilogue off/on: kernel check, decode profile at 64 with greedy tokens compared, steady state at 64
    #     int4:mma off, on, off, on (GLU_SS=1: MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER=1 in every arm) (~8 min)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    export MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER=${GLU_SS:-0}
    timeout 90 python3 benchmarks/int4_glu_check.py --out "$out/check" > "$out/check.log" 2>&1
    echo "int4_glu_check rc $?"; tail -1 "$out/check.log"
    dp_greedy_ab MODEL_SERVER_INT4_GLU_EPILOGUE
    for arm in off1:0 on1:1 off2:0 on2:1; do
      MODEL_SERVER_INT4_GLU_EPILOGUE=${arm#*:} ss_arm "ss_${arm%:*}" 75 int4:mma 64
    done ;;
  fuse64)  # both INT4 launch cuts together (split-K sums in their consumers + the GLU epilogue) off/on: decode profile at
    #        64 with greedy tokens compared, then steady state at 64: on (int4:mma, bf16), off (int4:mma), on (bf16,
    #        int4:mma): the ratio with both on, twice, and the INT4 A/B (~8 min)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    DP0_VARIANTS=rope-kv-off,served DP0_TIMEOUT=120 dp_greedy_ab MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER \
      MODEL_SERVER_INT4_GLU_EPILOGUE
    MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER=1 MODEL_SERVER_INT4_GLU_EPILOGUE=1 ss_arm ss_on1 115 int4:mma,bf16 64
    ss_arm ss_off 70 int4:mma 64
    MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER=1 MODEL_SERVER_INT4_GLU_EPILOGUE=1 ss_arm ss_on2 115 bf16,int4:mma 64 ;;
  wave)  # where the 64-stream wave's stall goes, both INT4 cuts on: step traces (device busy, gaps, kernels) of int4
    #      and bf16 at 64 streams over 1 s, then bursts of 1-64 prompts with a profile of the 64 (~5 min)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    export MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER=1 MODEL_SERVER_INT4_GLU_EPILOGUE=1
    for q in int4 bf16; do
      timeout 120 python3 benchmarks/step_trace.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --quant "$q" \
        --streams 64 --trace-s "${TRACE_S:-1.0}" --top-gaps 30 --out "$out/tr_$q" > "$out/tr_$q.log" 2>&1
      echo "step_trace $q rc $?"; tail -2 "$out/tr_$q.log"
    done
    timeout 200 python3 benchmarks/prefill_burst.py --model-dir /tmp/m1b --quants bf16,int4:mma --profile \
      --commit "$EDGE_EVAL_COMMIT" --out "$out/b" > "$out/b.log" 2>&1; echo "prefill_burst rc $?"
    grep -E "^\||profile:" "$out/b.log" ;;
  burst2)  # the 64-prompt prefill burst (one eager pass of 4,096 tokens by default): bursts of 32 and 64 with kernel and
    #        host profiles of the 64, int4:mma and bf16 (b/); the same with MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS=4096
    #        (b_g4096/: the 64 prompts in one graphed pass); then the steady state at 64 with it, int4:mma and bf16
    #        (ss_g4096/); the burst of 64 with MODEL_SERVER_FAST_MAX_PREFILL_TOKENS=2048 (b_p2048/: two graphed
    #        passes of 2,048) (~6.5 min; B2_BURSTS=64 B2_SS=0: the bursts of 64 only, ~3 min)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    timeout 150 python3 benchmarks/prefill_burst.py --model-dir /tmp/m1b --quants int4:mma,bf16 --bursts "${B2_BURSTS:-32,64}" \
      --reps 5 --profile --commit "$EDGE_EVAL_COMMIT" --out "$out/b" > "$out/b.log" 2>&1; echo "prefill_burst rc $?"
    grep -E "^\||profile:" "$out/b.log"
    MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS=4096 timeout 120 python3 benchmarks/prefill_burst.py --model-dir /tmp/m1b \
      --quants int4:mma,bf16 --bursts "${B2_BURSTS:-32,64}" --reps 5 --commit "$EDGE_EVAL_COMMIT" --out "$out/b_g4096" \
      > "$out/b_g4096.log" 2>&1; echo "prefill_burst (graphs to 4096 tokens) rc $?"; grep -E "^\|" "$out/b_g4096.log"
    MODEL_SERVER_FAST_MAX_PREFILL_TOKENS=2048 timeout 120 python3 benchmarks/prefill_burst.py --model-dir /tmp/m1b \
      --quants int4:mma,bf16 --bursts 64 --reps 5 --commit "$EDGE_EVAL_COMMIT" --out "$out/b_p2048" \
      > "$out/b_p2048.log" 2>&1; echo "prefill_burst (passes of at most 2048 tokens) rc $?"; grep -E "^\|" "$out/b_p2048.log"
    [ "${B2_SS:-1}" = 1 ] && MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS=4096 ss_arm ss_g4096 115 int4:mma,bf16 64 ;;
  int4pack)  # the mma mode's int4pack copy (int4_choice.mma_int4pack_rows): per-linear kernel times at IP_MS rows
    #       (mma_rows/), the steady state bf16 vs int4:mma with the copy at IP_CONC (ss_on/), then int4:mma without it
    #       (ss_off/, MODEL_SERVER_INT4_MMA_INT4PACK_ROWS=0; IP_AB=0 skips it)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    if [ "${IP_KERNELS:-1}" = 1 ]; then
      timeout "${IP_K_TIMEOUT:-150}" python3 benchmarks/int4_mma_bench.py --ms "${IP_MS:-1,2,4,8}" --no-sweep --out "$out/mma_rows" \
        > "$out/mma_rows.log" 2>&1; echo "int4_mma_bench rc $?"; grep -E "^\| (qkv|o_proj|down|gate|lm)" "$out/mma_rows.log" | cut -c1-150
    fi
    ss_arm ss_on "${IP_SS_TIMEOUT:-300}" bf16,int4:mma "${IP_CONC:-1,8,64}"
    if [ "${IP_AB:-1}" = 1 ]; then
      MODEL_SERVER_INT4_MMA_INT4PACK_ROWS=0 ss_arm ss_off "${IP_OFF_TIMEOUT:-150}" int4:mma "${IP_OFF_CONC:-1,8}"
    fi ;;
  mmaglu)  # the mma kernel's GLU epilogue (int4_mma_glu.py): its first-use check and per row count bits and device time
    #     against the plain kernel + SiLU-mul (glu/), then the steady state bf16 vs int4:mma at GL_CONC (1) with it (ss_on/,
    #     MODEL_SERVER_INT4_MMA_GLU=1: the default since 2026-12-07 22:10)
    #     and int4:mma without it (ss_off/, MODEL_SERVER_INT4_MMA_GLU=0; GL_AB=0 skips it)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    timeout "${GL_K_TIMEOUT:-90}" python3 benchmarks/int4_mma_glu_check.py --out "$out/glu" --commit "$EDGE_EVAL_COMMIT" \
      > "$out/glu.log" 2>&1; echo "int4_mma_glu_check rc $?"; grep -E "^(\||NVIDIA|.*check)" "$out/glu.log" | head -12
    MODEL_SERVER_INT4_MMA_GLU=1 ss_arm ss_on "${GL_SS_TIMEOUT:-150}" bf16,int4:mma "${GL_CONC:-1}"
    echo "ss_on (bf16, int4:mma) $(grep -ho '"mma_glu_ready": [a-z]*' "$out/ss_on/steady_state.json" | tr '\n' ' ')"
    if [ "${GL_AB:-1}" = 1 ]; then
      MODEL_SERVER_INT4_MMA_GLU=0 ss_arm ss_off "${GL_OFF_TIMEOUT:-90}" int4:mma "${GL_CONC:-1}"
      echo "ss_off (int4:mma) $(grep -ho '"mma_glu_ready": [a-z]*' "$out/ss_off/steady_state.json" | tr '\n' ' ')"
    fi ;;
  paired)  # the Triton GEMM reading each group's (scale, zero) as one 32-bit word (MODEL_SERVER_INT4_TRITON_PAIRED_SCALES):
    #     bits and hot / cold time per linear at PS_MS rows (k/), the same at 64 rows with 2 pipeline stages (k_st2/,
    #     MODEL_SERVER_INT4_TRITON_STAGES=2; PS_ST2=0 skips it), then the steady state at PS_CONC (64) with it on,
    #     int4:mma then bf16 (ss_on/), and int4:mma with it off in the next process (ss_off/; PS_AB=0 skips it) (~6 min)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    timeout "${PS_K_TIMEOUT:-200}" python3 benchmarks/int4_paired_check.py --out "$out/k" --ms "${PS_MS:-16,32,64,256}" \
      > "$out/k.log" 2>&1; echo "int4_paired_check rc $?"; tail -6 "$out/k.log"
    if [ "${PS_ST2:-1}" = 1 ]; then    # with the scales' loads gone, do 2 stages (more programs per SM) now pay at 64?
      MODEL_SERVER_INT4_TRITON_STAGES=2 timeout "${PS_ST2_TIMEOUT:-90}" python3 benchmarks/int4_paired_check.py \
        --out "$out/k_st2" --ms 64 > "$out/k_st2.log" 2>&1; echo "int4_paired_check (2 stages) rc $?"; tail -3 "$out/k_st2.log"
    fi
    MODEL_SERVER_INT4_TRITON_PAIRED_SCALES=1 ss_arm ss_on "${PS_SS_TIMEOUT:-130}" int4:mma,bf16 "${PS_CONC:-64}"
    if [ "${PS_AB:-1}" = 1 ]; then
      MODEL_SERVER_INT4_TRITON_PAIRED_SCALES=0 ss_arm ss_off "${PS_OFF_TIMEOUT:-80}" int4:mma "${PS_CONC:-64}"
    fi ;;
  prope)  # the prefill rotary kernel (engines/fast/rope_prefill.py) vs the compiled op: rope_layout.py at 64 x 64 and
    #    16 x 256 (rope_*/: bits and device time), 64-prompt bursts with the switch compiled (b_c/) and triton (b_t/),
    #    then the steady state at 64 streams int4:mma,bf16 with triton (ss_t/) and compiled (ss_c/, next process)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    for nt in "64 64" "16 256"; do set -- $nt
      timeout 100 python3 benchmarks/rope_layout.py --n "$1" --t "$2" --out "$out/rope_n$1_t$2" > "$out/rope_n$1_t$2.log" 2>&1
      echo "rope_layout $1 x $2 rc $?"; grep -E '"same_bits|"(head_major|head_major_static|triton_kernel)"' "$out/rope_n$1_t$2.log" | tr -d '\n '; echo
    done
    for m in compiled triton; do
      MODEL_SERVER_FAST_PREFILL_ROPE=$m timeout 120 python3 benchmarks/prefill_burst.py --model-dir /tmp/m1b \
        --quants int4:mma,bf16 --bursts 64 --reps 5 --commit "$EDGE_EVAL_COMMIT" --out "$out/b_${m:0:1}" \
        > "$out/b_${m:0:1}.log" 2>&1; echo "prefill_burst ($m) rc $?"; grep -E "^\|" "$out/b_${m:0:1}.log"
    done
    MODEL_SERVER_FAST_PREFILL_ROPE=triton ss_arm ss_t "${PR_SS_TIMEOUT:-130}" int4:mma,bf16 64
    MODEL_SERVER_FAST_PREFILL_ROPE=compiled ss_arm ss_c "${PR_SS_TIMEOUT:-130}" int4:mma,bf16 64 ;;
  norms)  # the add + RMSNorm kernel (engines/fast/norm_kernel.py) vs the compiled ops: compiled_ops_static.py (ops/:
    #    device time, bits), the INT4 decode profile at 64 rows with the switch compiled (dp_c/) and triton (dp_t/) and
    #    their greedy tokens compared, then the steady state at NM_CONC int4:mma,bf16 with triton (ss_t/), compiled (ss_c/)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    timeout 180 python3 benchmarks/compiled_ops_static.py --rows 64,4096 --out "$out/ops" > "$out/ops.log" 2>&1
    echo "compiled_ops_static rc $?"
    grep -E '"(op|rows|splits|same_bits_as_eager|dynamic_us|static_us|rows_dynamic_us|triton_us|triton_h_same_bits|triton_y_max_ulps|[a-z_]*_error)"' \
      "$out/ops.log" | tr -d '\n ' | sed 's/"op"/\n"op"/g'; echo
    for m in compiled triton; do
      MODEL_SERVER_FAST_NORM=$m timeout 90 python3 benchmarks/decode_profile.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" \
        --out "$out/dp_${m:0:1}" --quants int4 --batches 64 --variants served --batch-greedy 64 > "$out/dp_${m:0:1}.log" 2>&1
      echo "decode_profile ($m) rc $?"; tail -1 "$out/dp_${m:0:1}.log"
    done
    python3 benchmarks/dp_greedy_compare.py "$out/dp_c/decode_profile.json" "$out/dp_t/decode_profile.json"
    MODEL_SERVER_FAST_NORM=triton ss_arm ss_t "${NM_SS_TIMEOUT:-130}" int4:mma,bf16 "${NM_CONC:-64}"
    MODEL_SERVER_FAST_NORM=compiled ss_arm ss_c "${NM_SS_TIMEOUT:-130}" int4:mma,bf16 "${NM_CONC:-64}" ;;
  shapes)  # MODEL_SERVER_FAST_COMPILE_SHAPES rows vs dynamic (engines/fast/fused.py): the INT4 decode profile at 64
    #    rows each way (dp_d/, dp_r/) with greedy tokens compared, the steady state at SH_CONC int4:mma,bf16 each way
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    for m in dynamic rows; do
      MODEL_SERVER_FAST_COMPILE_SHAPES=$m timeout 90 python3 benchmarks/decode_profile.py --model-dir /tmp/m1b \
        --commit "$EDGE_EVAL_COMMIT" --out "$out/dp_${m:0:1}" --quants int4 --batches 64 --variants served \
        --batch-greedy 64 > "$out/dp_${m:0:1}.log" 2>&1; echo "decode_profile ($m) rc $?"; tail -1 "$out/dp_${m:0:1}.log"
    done
    python3 benchmarks/dp_greedy_compare.py "$out/dp_d/decode_profile.json" "$out/dp_r/decode_profile.json"
    MODEL_SERVER_FAST_COMPILE_SHAPES=rows ss_arm ss_r "${SH_SS_TIMEOUT:-130}" int4:mma,bf16 "${SH_CONC:-64}"
    MODEL_SERVER_FAST_COMPILE_SHAPES=dynamic ss_arm ss_d "${SH_SS_TIMEOUT:-130}" int4:mma,bf16 "${SH_CONC:-64}" ;;
  gemlite)  # GemLite vs our INT4 Triton GEMM vs bf16 per shape and rows (gl/: gemlite_probe.json / .md)
    timeout "${GL_TIMEOUT:-480}" python3 benchmarks/gemlite_probe.py --ms "${GL_MS:-1,8,16,32,64}" --out "$out/gl" \
      > "$out/gl.log" 2>&1; echo "gemlite_probe rc $?"; tail -45 "$out/gl.log" ;;
  normshapes)  # both switches together (MODEL_SERVER_FAST_COMPILE_SHAPES=rows, MODEL_SERVER_FAST_NORM=triton; the
    #    defaults since 2026-12-07) against the earlier defaults (dynamic, compiled): the steady state at NS_CONC (64)
    #    int4:mma,bf16 each way in NS_ORDER (on,off: ss_on/,
    #    ss_off/; off,on for the other order), then with NS_DP=1 the INT4 decode profile at 64 each way (dp_off/, dp_on/)
    #    and their greedy tokens compared (2026-12-07 12:42 and 12:46 ran this by a local edit, one order each)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    ns_switches() {  # on: rows + triton; off: dynamic + compiled (the defaults before 2026-12-07)
      if [ "$1" = on ]; then export MODEL_SERVER_FAST_COMPILE_SHAPES=rows MODEL_SERVER_FAST_NORM=triton
      else export MODEL_SERVER_FAST_COMPILE_SHAPES=dynamic MODEL_SERVER_FAST_NORM=compiled; fi
    }
    NS_ORDER=${NS_ORDER:-on,off}; for a in ${NS_ORDER//,/ }; do ns_switches "$a"; ss_arm "ss_$a" "${NS_SS_TIMEOUT:-135}" int4:mma,bf16 "${NS_CONC:-64}"; done
    if [ "${NS_DP:-1}" = 1 ]; then
      for a in off on; do
        ns_switches "$a"
        timeout 85 python3 benchmarks/decode_profile.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" \
          --out "$out/dp_$a" --quants int4 --batches 64 --variants served --batch-greedy 64 > "$out/dp_$a.log" 2>&1
        echo "decode_profile ($a) rc $?"; tail -1 "$out/dp_$a.log"
      done
      ns_switches off
      python3 benchmarks/dp_greedy_compare.py "$out/dp_off/decode_profile.json" "$out/dp_on/decode_profile.json"
    fi ;;
  compiledops)  # dynamic vs static torch.compile of the fused elementwise ops, device time (rope/, ops/)
    for nt in "64 64" "16 256"; do set -- $nt
      timeout 100 python3 benchmarks/rope_layout.py --n "$1" --t "$2" --out "$out/rope_n$1_t$2" > "$out/rope_n$1_t$2.log" 2>&1
      echo "rope_layout $1 x $2 rc $?"; grep -E -A11 '"(us|errors)"' "$out/rope_n$1_t$2.log" | tr -d '\n '; echo
    done
    timeout 300 python3 benchmarks/compiled_ops_static.py --out "$out/ops" > "$out/ops.log" 2>&1; echo "compiled_ops_static rc $?"
    grep -E '"(op|rows|splits|same_bits_as_eager|static_same_bits|dynamic_us|static_us|rows_dynamic_same_bits|rows_dynamic_us|triton_us|[a-z_]*_error)"' "$out/ops.log" | tr -d '\n ' | sed 's/"op"/\n"op"/g'; echo ;;
  lmhead)  # the mma kernel's LM head configuration at few rows: the steady state bf16 vs int4:mma at LM_CONC (1,8)
    #     with the shipped table (ss_cur/), the LM head's sweep at LM_MS rows (1,8; LM_BUDGET s; lm/), its winners
    #     written into this checkout's table by int4_mma_tune.py (lm/tune.log, the table as lm/int4_mma_tuned.json),
    #     then int4:mma at LM_CONC in the next process with them (ss_new/)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    ss_arm ss_cur "${LM_SS_TIMEOUT:-260}" bf16,int4:mma "${LM_CONC:-1,8}"
    timeout "$(( ${LM_BUDGET:-120} + 90 ))" python3 benchmarks/int4_mma_bench.py --shapes lm_head --ms "${LM_MS:-1,8}" \
      --sweep-budget-s "${LM_BUDGET:-120}" --out "$out/lm" > "$out/lm.log" 2>&1; echo "int4_mma_bench rc $?"
    grep -E " M=[0-9]+:" "$out/lm.log" | cut -c1-300
    python3 benchmarks/int4_mma_tune.py "$out/lm/int4_mma.json" > "$out/lm/tune.log" 2>&1; echo "int4_mma_tune rc $?"
    cat "$out/lm/tune.log"; cp model_server/data/int4_mma_tuned.json "$out/lm/"
    ss_arm ss_new "${LM_NEW_TIMEOUT:-130}" int4:mma "${LM_CONC:-1,8}" ;;
  graph4096)  # prefill graphs to 4,096 tokens (the default since 7e1476d): greedy tokens of 64 concurrent requests
    #        graphed vs eager (agree/), the steady state at 64 with 4,096 (ss_4096/: bf16 first), then with 2,048
    #        (ss_2048/: int4:mma first; G4_SS2048=0 skips it) (~3.5 min; ~5.5 with ss_2048). G4_CONC=1,8,64
    #        G4_SS_TIMEOUT=300: ss_4096 at every concurrency of the target (~7 min without ss_2048)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    timeout 150 python3 benchmarks/prefill_graph_agree.py --model-dir /tmp/m1b --quants int4:mma,bf16 --caps 2048,4096 \
      --commit "$EDGE_EVAL_COMMIT" --out "$out/agree" > "$out/agree.log" 2>&1; echo "prefill_graph_agree rc $?"
    tail -4 "$out/agree.log"
    MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS=4096 ss_arm ss_4096 "${G4_SS_TIMEOUT:-115}" bf16,int4:mma "${G4_CONC:-64}"
    [ "${G4_SS2048:-1}" = 1 ] && MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS=2048 ss_arm ss_2048 115 int4:mma,bf16 64 ;;
  s46d)  # the 64-stream ratio twice more (int4 first, then bf16 first), then energy per token at 64 (~8 min)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    ss_arm ss_a 115 int4:mma,bf16 64
    ss_arm ss_b 115 bf16,int4:mma 64
    d=out/ept_bf16_int4
    timeout -s INT "${EPT_SECONDS:-200}" python3 benchmarks/energy_per_token.py --model-dir /tmp/m1b --device cuda \
      --energy-source nvml --quantizations bf16,int4 --concurrency "${EPT_CONC:-64}" --seconds 10 --reps 3 --out "$d" \
      > "$d.log" 2>&1; echo "ept rc $?"; stop_servers
    tar czf "$out/ept.tgz" "$d" "$d.log"; cat "$d/energy_per_token.md" ;;
  s46c)  # today's defaults: steady state bf16 vs int4:mma at 1/8/64 in one process, then seeded cold starts (~8 min)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    ss_arm ss "${SS_SECONDS:-280}" bf16,int4:mma "${SS_CONC:-1,8,64}"
    COLD_VARIANTS=${COLD_VARIANTS:-seeded,seeded-int4,seeded,seeded-int4} timeout 250 python3 benchmarks/cold_start_phases.py \
      --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/cold" > "$out/cold.log" 2>&1; echo "cold rc $?"
    stop_servers; cut -d'|' -f2,3,20,21 "$out/cold/cold_start_phases.md" ;;
  s46b)  # small-rows kernels' repeatability, PDL on the served stages, then steady state at 64 PDL on/off (~9 min)
    timeout 80 python3 benchmarks/int4_repeat_check.py --reps 6 --out "$out/rep" > "$out/rep.log" 2>&1
    echo "int4_repeat_check rc $?"; tail -1 "$out/rep.log"; grep '"eager_same": false' "$out/rep.log" | cut -c1-200
    timeout 60 python3 benchmarks/int4_pdl_check.py --pdl 0,1 --splits 1 --ms 33,48,64 --reps 6 --out "$out/chk" \
      > "$out/chk.log" 2>&1; echo "int4_pdl_check (served, PDL 0,1) rc $?"; tail -1 "$out/chk.log"
    grep -E '"(same_bits|eager_same)": false' "$out/chk.log" | cut -c1-160
    MODEL_SERVER_INT4_TRITON_PDL=1 timeout 50 python3 benchmarks/int4_kernels.py --ms 64 --no-sweep --methods bf16,triton \
      --out "$out/k_pdl" > "$out/k_pdl.log" 2>&1; echo "int4_kernels (PDL) rc $?"; sed -n '/^Whole step/,$p' "$out/k_pdl.log" | sed -n 5p
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    MODEL_SERVER_INT4_TRITON_PDL=1 ss_arm ss_pdl 150 bf16,int4:mma,int4:triton 64
    ss_arm ss 60 int4:mma 64
    timeout 100 python3 benchmarks/decode_profile.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/dp" \
      --quants bf16,int4 --batches 64 --variants served > "$out/dp.log" 2>&1; echo "decode_profile rc $?"; tail -4 "$out/dp.log" ;;
  s46)   # the served stages rule end to end + the fence A/B at 64 rows + bf16 vs int4:mma at 64 in one process (~9 min)
    timeout 50 python3 benchmarks/int4_pdl_check.py --pdl 0 --splits 1 --ms 33,48,64 --reps 6 --out "$out/chk" \
      > "$out/chk.log" 2>&1; echo "int4_pdl_check (served) rc $?"; tail -1 "$out/chk.log"
    grep '"eager_same": false' "$out/chk.log" | cut -c1-160
    for arm in nofence:0 fence:1; do
      MODEL_SERVER_INT4_TRITON_FENCE=${arm#*:} MODEL_SERVER_INT4_TRITON_STAGES=3 timeout 70 python3 \
        benchmarks/int4_pdl_check.py --pdl 0 --ms 64 --splits 1,8 --reps 6 --out "$out/chk_${arm%:*}" \
        > "$out/chk_${arm%:*}.log" 2>&1; echo "int4_pdl_check (${arm%:*}, 3 stages) rc $?"; tail -1 "$out/chk_${arm%:*}.log"
      grep '"eager_same": false' "$out/chk_${arm%:*}.log" | cut -c1-160
    done
    timeout 50 python3 benchmarks/int4_kernels.py --ms 64 --no-sweep --methods bf16,triton --out "$out/k" \
      > "$out/k.log" 2>&1; echo "int4_kernels rc $?"; sed -n '/^Whole step/,$p' "$out/k.log" | sed -n 5p
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    ss_arm ss "${SS_SECONDS:-230}" bf16,int4:mma 64 ;;
  served)
    timeout 50 python3 benchmarks/int4_pdl_check.py --pdl 0 --splits 1 --ms 33,48,64 --reps 6 --out "$out/chk" \
      > "$out/chk.log" 2>&1; echo "int4_pdl_check rc $?"; tail -1 "$out/chk.log"
    timeout 50 python3 benchmarks/int4_kernels.py --ms 64 --no-sweep --methods bf16,triton --out "$out/k" \
      > "$out/k.log" 2>&1; echo "int4_kernels rc $?"; sed -n '/^Whole step/,$p' "$out/k.log" | sed -n 5p
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    ss_arm ss "${SS_SECONDS:-90}" int4:mma 64 ;;
  stages)
    for st in 3 2 4; do
      MODEL_SERVER_INT4_TRITON_STAGES=$st timeout 80 python3 benchmarks/int4_pdl_check.py --pdl 0 --splits 1 \
        --ms 48,64,128,256 --reps 6 --out "$out/chk_$st" > "$out/chk_$st.log" 2>&1; echo "int4_pdl_check (stages $st) rc $?"
      tail -1 "$out/chk_$st.log"; grep '"eager_same": false' "$out/chk_$st.log" | cut -c1-200
      MODEL_SERVER_INT4_TRITON_STAGES=$st timeout 80 python3 benchmarks/int4_kernels.py --ms 48,64,128,256 --no-sweep \
        --methods bf16,triton --out "$out/k_$st" > "$out/k_$st.log" 2>&1; echo "int4_kernels (stages $st) rc $?"
      sed -n '/^Whole step/,$p' "$out/k_$st.log" | sed -n 5,8p
    done
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    MODEL_SERVER_INT4_TRITON_STAGES=${STAGES_SS:-2} ss_arm ss "${SS_SECONDS:-90}" int4:mma 64 ;;
  splitdiag)
    for arm in kernel:0 ticket:0 kernel:2 kernel:4; do
      timeout 100 python3 benchmarks/int4_pdl_check.py --pdl 0 --shapes gate_up_proj,lm_head --ms 48,64 --splits 2,8 \
        --reduce "${arm%:*}" --stages "${arm#*:}" --out "$out/diag_${arm%:*}${arm#*:}" > "$out/diag_${arm%:*}${arm#*:}.log" 2>&1
      echo "int4_pdl_check ($arm) rc $?"
      python3 -c "import json,sys; [print(r['shape'], r['m'], 'split', r['split_k'], 'st', r.get('stages'), r.get('reduce'), 'progs', r.get('programs'), 'eager_same', r.get('eager_same'), 'err eager', {k: round(v, 5) for k, v in r.get('max_rel_err_eager', {}).items()}, 'graph', {k: round(v, 5) for k, v in r.get('max_rel_err_graph', {}).items()}, r.get('error', '')) for r in json.load(open(sys.argv[1]))['rows']]" "$out/diag_${arm%:*}${arm#*:}/int4_pdl_check.json"
    done ;;
  final)
    timeout 150 python3 benchmarks/int4_pdl_check.py --out "$out/pdl" > "$out/pdl.log" 2>&1; echo "int4_pdl_check rc $?"
    grep -v '"same_bits": true' "$out/pdl.log" | cut -c1-300 | tail -12
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    ss_arm ss "${SS_SECONDS:-380}" bf16,int4:mma "${SS_CONC:-1,8,64}" ;;
  burst)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    timeout 200 python3 benchmarks/prefill_burst.py --model-dir /tmp/m1b --quants bf16,int4:mma --profile \
      --commit "$EDGE_EVAL_COMMIT" --out "$out/b" > "$out/b.log" 2>&1; echo "prefill_burst rc $?"
    grep -E "^\||profile:" "$out/b.log"
    MODEL_SERVER_INT4_PREFILL_DEQUANT_ROWS=0 timeout 120 python3 benchmarks/prefill_burst.py --model-dir /tmp/m1b \
      --quants int4:mma --commit "$EDGE_EVAL_COMMIT" --out "$out/b_fused" > "$out/b_fused.log" 2>&1
    echo "prefill_burst (fused) rc $?"; grep -E "^\|" "$out/b_fused.log"
    timeout 300 python3 benchmarks/int4_kernels.py --ms 64 --sweep-ms 64 --sweep-kernels triton --wide-sweep \
      --methods bf16,triton --sweep-budget-s "${SW_BUDGET:-200}" --reps 30 --out "$out/sw64" > "$out/sw64.log" 2>&1
    echo "int4_kernels rc $?"; grep -E "sweep:" "$out/sw64.log" | cut -c1-250 ;;
  pdl)
    for arm in k_off:0 k_pdl:1; do
      MODEL_SERVER_INT4_TRITON_PDL=${arm#*:} timeout 100 python3 benchmarks/int4_kernels.py --ms 16,32,64 --no-sweep \
        --methods bf16,triton --out "$out/${arm%:*}" > "$out/${arm%:*}.log" 2>&1; echo "int4_kernels (${arm%:*}) rc $?"
      sed -n '/^Whole step/,$p' "$out/${arm%:*}.log" | sed -n 3,7p
    done
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    MODEL_SERVER_INT4_TRITON_PDL=1 ss_arm ss_pdl "${SS_SECONDS:-90}" int4:mma "${SS_CONC:-64}"
    ss_arm ss "${SS_SECONDS:-90}" int4:mma "${SS_CONC:-64}"
    ss_arm ss_bf16 "${SS_SECONDS:-90}" bf16 "${SS_CONC:-64}" ;;
  prefill)
    timeout 150 python3 benchmarks/int4_kernels.py --ms "${PF_MS:-64,256,512,1024,2048}" --no-sweep --no-lm-head \
      --methods bf16,triton,triton-dequant --out "$out/k_pf" > "$out/k_pf.log" 2>&1; echo "int4_kernels rc $?"
    MODEL_SERVER_INT4_TRITON_DEQ=fma-ptx timeout 100 python3 benchmarks/int4_kernels.py \
      --ms "${PF_MS:-64,256,512,1024,2048}" --no-sweep --no-lm-head --methods bf16,triton --out "$out/k_pfptx" \
      > "$out/k_pfptx.log" 2>&1; echo "int4_kernels (fma-ptx) rc $?"
    sed -n '/^Whole step/,$p' "$out/k_pf.log" | head -12; sed -n '/^Whole step/,$p' "$out/k_pfptx.log" | head -12
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    ss_arm ss_deq "${SS_SECONDS:-90}" int4:mma "${SS_CONC:-64}"
    MODEL_SERVER_INT4_PREFILL_DEQUANT_ROWS=0 ss_arm ss_fused "${SS_SECONDS:-90}" int4:mma "${SS_CONC:-64}"
    ss_arm ss_bf16 "${SS_SECONDS:-90}" bf16 "${SS_CONC:-64}" ;;
  deqptx)
    MODEL_SERVER_INT4_TRITON_DEQ=fma-ptx timeout 90 python3 benchmarks/int4_kernels.py --ms 32,64 --no-sweep \
      --methods bf16,triton --out "$out/k_ptx" > "$out/k_ptx.log" 2>&1; echo "int4_kernels (fma-ptx) rc $?"
    sed -n '/^Whole step/,$p' "$out/k_ptx.log" | head -9; grep -E "^\| [0-9]+ x [0-9]+ \| (32|64) " "$out/k_ptx.log"
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    for arm in ss_ptx:fma-ptx:int4:mma:32,64 ss_bf16:fp32:bf16:32,64 ss_fma:fma:int4:mma:64; do   # consecutive processes
      rest=${arm#*:}; export MODEL_SERVER_INT4_TRITON_DEQ=${rest%%:*}; rest=${rest#*:}
      ss_arm "${arm%%:*}" "${SS_SECONDS:-100}" "${rest%:*}" "${rest##*:}"
    done; unset MODEL_SERVER_INT4_TRITON_DEQ ;;
  deq)
    for d in fp32 fma; do
      MODEL_SERVER_INT4_TRITON_DEQ=$d timeout 100 python3 benchmarks/int4_kernels.py --ms 16,32,64 --no-sweep \
        --methods bf16,triton --out "$out/k_$d" > "$out/k_$d.log" 2>&1; echo "int4_kernels ($d) rc $?"
      sed -n '/^Whole step/,$p' "$out/k_$d.log" | head -9; grep -E "^\| [0-9]+ x [0-9]+ \| (32|64) " "$out/k_$d.log"
    done
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    for arm in ss_fma:fma:int4:mma ss:fp32:int4:mma ss_bf16:fp32:bf16; do   # consecutive processes
      rest=${arm#*:}; export MODEL_SERVER_INT4_TRITON_DEQ=${rest%%:*}
      ss_arm "${arm%%:*}" "${SS_SECONDS:-110}" "${rest#*:}" "${SS_CONC:-32,64}"
    done; unset MODEL_SERVER_INT4_TRITON_DEQ ;;
  l2pf)
    timeout 120 python3 benchmarks/int4_l2_prefetch.py --commit "$EDGE_EVAL_COMMIT" --out "$out/l2pf" \
      > "$out/l2pf.log" 2>&1; echo "int4_l2_prefetch rc $?"; cat "$out/l2pf.log" | cut -c1-300
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    for arm in ss_pf:${L2PF_ARM:-side}:int4:mma ss:off:int4:mma ss_bf16:off:bf16; do   # consecutive processes
      rest=${arm#*:}; export MODEL_SERVER_INT4_L2_PREFETCH=${rest%%:*}
      ss_arm "${arm%%:*}" "${SS_SECONDS:-135}" "${rest#*:}" "${SS_CONC:-1,8,64}"
    done; unset MODEL_SERVER_INT4_L2_PREFETCH ;;
  pick)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    timeout 150 python3 benchmarks/decode_profile.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/dp" \
      --quants bf16,int4 --batches 1,64 --variants pick-eager,served > "$out/decode_profile.log" 2>&1
    echo "decode_profile rc $?"; tail -6 "$out/decode_profile.log"
    for arm in ss:1 ss_eager:0; do     # the engine's default (kernels), then MODEL_SERVER_FAST_PICK_KERNEL=0
      d=${arm%%:*}
      if [ "${arm#*:}" = 0 ]; then export MODEL_SERVER_FAST_PICK_KERNEL=0; else unset MODEL_SERVER_FAST_PICK_KERNEL; fi
      timeout "${SS_SECONDS:-200}" python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" \
        --out "$out/$d" --quants "${SS_QUANTS:-bf16,int4:mma}" --concurrency "${SS_CONC:-1,64}" --http-concurrency '' \
        > "$out/$d.log" 2>&1; echo "steady_state ($d) rc $?"; grep -E "tok/s \[" "$out/$d.log"
    done; unset MODEL_SERVER_FAST_PICK_KERNEL ;;
  splitk)  # the split-K reduction A/B: kernels per linear (ticket vs kernel, and the check), then the steady state per arm
    timeout 150 python3 benchmarks/int4_splitk_bench.py --commit "$EDGE_EVAL_COMMIT" --out "$out/splitk" \
      > "$out/splitk.log" 2>&1; echo "int4_splitk_bench rc $?"; sed -n '/^# INT4 Triton GEMM/,$p' "$out/splitk.log"
    grep -E "FAILED|Error" "$out/splitk.log" | head -5
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    for arm in ss_ticket:ticket ss_kernel:kernel; do     # consecutive processes, the default (ticket) first
      d=${arm%%:*}
      export MODEL_SERVER_INT4_TRITON_SPLIT_REDUCE=${arm#*:}
      timeout "${SS_SECONDS:-170}" python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" \
        --out "$out/$d" --quants "${SS_QUANTS:-int4:mma}" --concurrency "${SS_CONC:-64,32}" --http-concurrency '' \
        --agree-prompts 0 > "$out/$d.log" 2>&1; echo "steady_state ($d) rc $?"; grep -E "tok/s \[" "$out/$d.log"
    done; unset MODEL_SERVER_INT4_TRITON_SPLIT_REDUCE ;;
  decode)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    timeout 280 python3 benchmarks/decode_profile.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/dp" \
      > "$out/decode_profile.log" 2>&1; echo "decode_profile rc $?"; tail -8 "$out/decode_profile.log"
    timeout 330 python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/ss" \
      --quants bf16,int4 --concurrency 1,8,64 --http-concurrency '' ${SS_ARGS:-} > "$out/steady_state.log" 2>&1
    echo "steady_state rc $?"; tail -12 "$out/steady_state.log" ;;
  http)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    for iv in ${SWITCHES:-default 0.0005}; do
      if [ "$iv" = default ]; then unset MODEL_SERVER_SWITCH_INTERVAL_S; else export MODEL_SERVER_SWITCH_INTERVAL_S=$iv; fi
      timeout 200 python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/http_$iv" \
        --quants bf16 --concurrency 64 --http-concurrency 64 --agree-prompts 0 > "$out/http_$iv.log" 2>&1
      echo "switch interval $iv rc $?"; tail -3 "$out/http_$iv.log"
    done; unset MODEL_SERVER_SWITCH_INTERVAL_S ;;
  httpw)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    for iv in ${SWITCHES:-default}; do      # the model server's switch interval (MODEL_SERVER_SWITCH_INTERVAL_S)
      if [ "$iv" = default ]; then unset MODEL_SERVER_SWITCH_INTERVAL_S; d=httpw; else export MODEL_SERVER_SWITCH_INTERVAL_S=$iv; d=httpw_$iv; fi
      timeout "${HTTPW_SECONDS:-360}" python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" \
        --out "$out/$d" --quants bf16 --concurrency "${HTTPW_CONC:-64,256}" --http-concurrency "${HTTPW_CONC:-64,256}" \
        --api-workers "${WORKERS:-0,4}" --agree-prompts 0 --window-s "${WINDOW_S:-10}" \
        > "$out/$d.log" 2>&1; echo "steady_state ($iv) rc $?"; stop_servers; tail -4 "$out/$d.log"
    done; unset MODEL_SERVER_SWITCH_INTERVAL_S ;;
  httpo)   # the fast engine's prefill overlap (MODEL_SERVER_FAST_OVERLAP_PREFILL) A/B, in-process and HTTP per setting
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    for ov in ${OVERLAPS:-0 1}; do
      export MODEL_SERVER_FAST_OVERLAP_PREFILL=$ov
      timeout "${HTTPW_SECONDS:-280}" python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" \
        --out "$out/overlap_$ov" --quants bf16 --concurrency "${HTTPW_CONC:-64}" --http-concurrency "${HTTPW_CONC:-64}" \
        --api-workers "${WORKERS:-2}" --agree-prompts 0 --window-s "${WINDOW_S:-10}" \
        > "$out/overlap_$ov.log" 2>&1; echo "steady_state (overlap $ov) rc $?"; stop_servers; tail -4 "$out/overlap_$ov.log"
    done; unset MODEL_SERVER_FAST_OVERLAP_PREFILL ;;
  gemv)    # a Triton GEMV vs cuBLAS on the decode projections at 1-8 rows (torch and Triton only)
    timeout "${GEMV_SECONDS:-420}" python3 benchmarks/gemv_probe.py --commit "$EDGE_EVAL_COMMIT" --rows "${GEMV_ROWS:-1,2,4,8}" \
      --shapes "${GEMV_SHAPES:-qkv,o,gate_up,down,lm_head}" --out "$out/gemv" > "$out/gemv_probe.log" 2>&1
    echo "gemv_probe rc $?"; tail -22 "$out/gemv_probe.log" ;;
  trace|next)   # step_trace.py: the device's busy time, gaps and kernels per step under steady in-process load
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    [ "$1" = next ] && TRACE_ATTN=${TRACE_ATTN:-0 1}       # next: the trace with SDPA, then with the Triton kernel
    if [ "$1" = next ]; then
      timeout 200 python3 benchmarks/decode_profile.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/dp" \
        --quants bf16 --variants attn-sdpa,attn-triton > "$out/decode_profile.log" 2>&1; echo "decode_profile rc $?"
      tail -4 "$out/decode_profile.log"
    fi
    for q in ${TRACE_QUANTS:-bf16}; do for n in ${TRACE_STREAMS:-64 1}; do for a in ${TRACE_ATTN:-0}; do
      [ "$1" = next ] && [ "$n" != 64 ] && continue
      t=trace_${q}_${n}_attn$a
      MODEL_SERVER_FAST_DECODE_ATTN=$a timeout 150 python3 benchmarks/step_trace.py --model-dir /tmp/m1b \
        --commit "$EDGE_EVAL_COMMIT" --quant "$q" --streams "$n" --out "$out/$t" > "$out/$t.log" 2>&1
      echo "step_trace $q x$n decode attn $a rc $?"; tail -2 "$out/$t.log"
    done; done; done
    if [ "$1" = next ]; then
      for a in 0 1; do
        MODEL_SERVER_FAST_DECODE_ATTN=$a timeout 150 python3 benchmarks/steady_state.py --model-dir /tmp/m1b \
          --commit "$EDGE_EVAL_COMMIT" --out "$out/ss_attn$a" --quants bf16 --concurrency 1,64 --http-concurrency '' \
          --agree-prompts 0 > "$out/ss_attn$a.log" 2>&1; echo "steady_state (decode attn $a) rc $?"; tail -4 "$out/ss_attn$a.log"
      done
    fi ;;
  agree)   # quant_agreement.py on the GPU: the same trained model and prompts, the formats' GPU kernels
    for sd in ${AGREE_SEEDS:-0 1 2}; do
      timeout 200 python3 benchmarks/quant_agreement.py --device cuda --seed "$sd" --commit "$EDGE_EVAL_COMMIT" \
        --quants "${AGREE_QUANTS:-bf16,int4,int4-head16,nf4}" --out "out/qa_s$sd" > "$out/qa_s$sd.log" 2>&1; echo "quant_agreement seed $sd rc $?"; tail -7 "$out/qa_s$sd.log"
      cp "out/qa_s$sd/quant_agreement.json" "$out/qa_s$sd.json" 2>/dev/null
    done ;;
  attnlong)   # SDPA vs the Triton decode attention with long prompts (the keys each row reads grow with the context)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    timeout 300 python3 benchmarks/decode_profile.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/dp_long" \
      --quants bf16 --variants attn-sdpa,attn-triton --prompt-len "${ATTN_PROMPT:-1024}" --new-tokens 128 \
      > "$out/decode_profile_long.log" 2>&1; echo "decode_profile (long) rc $?"; tail -4 "$out/decode_profile_long.log" ;;
  ropekv)  # decode's rotary + K/V writes as one kernel: profile off/on (bf16, int4), then the steady state with it on
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    timeout 300 python3 benchmarks/decode_profile.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/dp" \
      --quants "${DP_QUANTS:-bf16,int4}" --variants rope-kv-off,rope-kv-on > "$out/decode_profile.log" 2>&1
    echo "decode_profile rc $?"; tail -6 "$out/decode_profile.log"
    timeout 200 python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/ss" \
      --quants bf16 --concurrency "${SS_CONC:-1,64}" --http-concurrency '' --agree-prompts 0 > "$out/steady_state.log" 2>&1
    echo "steady_state rc $?"; tail -5 "$out/steady_state.log" ;;
  httpm)   # prompts prefilled inside decode steps (MODEL_SERVER_FAST_MIXED_SEGMENTS): step costs and agreement
           # (benchmarks/mixed_step.py, MIXED_STEP=0 skips it), then in-process vs HTTP per setting (MIXEDS)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    mkdir -p out/httpm
    if [ "${MIXED_STEP:-1}" = 1 ]; then
      timeout 200 python3 benchmarks/mixed_step.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" \
        --out out/httpm/mixed_step > out/httpm/mixed_step.log 2>&1; echo "mixed_step rc $?"; tail -6 out/httpm/mixed_step.log
    fi
    for spec in ${MIXEDS:-0 4}; do     # segments[:min segments]
      m=${spec%%:*}; case $spec in *:*) mn=${spec#*:} ;; *) mn=1 ;; esac; tag=${spec/:/_}
      export MODEL_SERVER_FAST_MIXED_SEGMENTS=$m MODEL_SERVER_FAST_MIXED_MIN_SEGMENTS=$mn
      timeout "${HTTPW_SECONDS:-280}" python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" \
        --out "out/httpm/mixed_$tag" --quants bf16 --concurrency "${HTTPW_CONC:-64}" --http-concurrency "${HTTPW_CONC:-64}" \
        --api-workers "${WORKERS:-4}" --agree-prompts 0 --window-s "${WINDOW_S:-10}" \
        > "out/httpm/mixed_$tag.log" 2>&1; echo "steady_state (mixed segments $spec) rc $?"; stop_servers; tail -4 "out/httpm/mixed_$tag.log"
    done; unset MODEL_SERVER_FAST_MIXED_SEGMENTS MODEL_SERVER_FAST_MIXED_MIN_SEGMENTS
    tar czf "$out/httpm.tgz" out/httpm ;;
  mma)
    timeout 200 python3 benchmarks/int4_mma_bench.py --smoke > "$out/mma_smoke.log" 2>&1; echo "smoke rc $?"
    grep -c " ok$" "$out/mma_smoke.log"; grep -E "FAIL|smoke:" "$out/mma_smoke.log" | head -20
    timeout "$(( ${MMA_BUDGET:-300} + 240 ))" python3 benchmarks/int4_mma_bench.py --ms "${MMA_MS:-1,8,16,32,64}" \
      --sweep-budget-s "${MMA_BUDGET:-300}" $([ "${MMA_SWEEP:-1}" = 0 ] && echo --no-sweep) --out "$out/mma" \
      > "$out/mma.log" 2>&1; echo "int4_mma_bench rc $?"
    grep -B2 -A12 "Linears per decode step" "$out/mma.log"; grep -E "M=(1|8|64):" "$out/mma.log" | cut -c1-260
    if [ "${MMA_SS:-0}" = 1 ]; then    # then the steady state in-process: bf16 vs INT4 with the mma kernel (SS_QUANTS, SS_CONC)
      [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
      timeout "${SS_SECONDS:-400}" python3 benchmarks/steady_state.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" \
        --out "$out/ss" --quants "${SS_QUANTS:-bf16,int4:mma}" --concurrency "${SS_CONC:-1,8,64}" --http-concurrency '' \
        > "$out/steady_state.log" 2>&1; echo "steady_state rc $?"; tail -12 "$out/steady_state.log"; grep -i -E "warn|error" \
        "$out/steady_state.log" | head -5
      ss_again() {   # int4:mma again in the next process with the environment settings $1, into $out/$2: an A/B
        env $1 timeout "${SS_SECONDS:-400}" python3 benchmarks/steady_state.py --model-dir /tmp/m1b \
          --commit "$EDGE_EVAL_COMMIT" --out "$out/$2" --quants int4:mma --concurrency "${SS_CONC:-1,8,64}" \
          --http-concurrency '' >> "$out/steady_state.log" 2>&1; echo "steady_state ($1) rc $?"
        tail -4 "$out/steady_state.log"
      }
      # the rule's configs (before the measured table); any settings, e.g. MMA_SS_B=MODEL_SERVER_INT4_MMA_MAX_ROWS=32
      [ "${MMA_SS_RULE:-0}" = 1 ] && ss_again MODEL_SERVER_INT4_MMA_CONFIGS=rule ss_rule
      [ -n "${MMA_SS_B:-}" ] && ss_again "$MMA_SS_B" ss_b
    fi ;;
  mmaprof)  # Nsight Compute on the mma kernel: each merged shape and the LM head at MMA_MS rows (default 64), two launches each
    ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null); echo "ncu: ${ncu_bin:-none}"
    timeout "${MMAPROF_SECONDS:-480}" "$ncu_bin" --clock-control none --target-processes all -k regex:w4a16_mma -f -o "$out/mma_prof" \
      --section SpeedOfLight --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis \
      --section LaunchStats --section Occupancy --section InstructionStats \
      python3 benchmarks/int4_mma_bench.py --once --ms "${MMA_MS:-64}" > "$out/mmaprof.log" 2>&1; echo "ncu rc $?"
    "$ncu_bin" --import "$out/mma_prof.ncu-rep" --page details > "$out/mma_prof.txt" 2>&1
    grep -E "once:|w4a16_mma|Duration|Memory Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Achieved Occupancy|Stall|Warp Cycles Per Issued|Executed Instructions" \
      "$out/mma_prof.txt" | head -120
    python3 benchmarks/int4_mma_ncu_table.py "$out" ;;
  readw)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    timeout 200 python3 benchmarks/read_weights.py --model-dir /tmp/m1b --device cuda --reps 5 --commit "$EDGE_EVAL_COMMIT" \
      --out "$out/readw" > "$out/readw.log" 2>&1; echo "read_weights rc $?"; tail -8 "$out/readw.log" ;;
  imports)
    timeout 300 python3 benchmarks/import_torch.py --reps 5 --commit "$EDGE_EVAL_COMMIT" --out "$out/imports" \
      > "$out/imports.log" 2>&1; echo "import_torch rc $?"; tail -14 "$out/imports.log" ;;
  ctax)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    timeout "${CTAX_SECONDS:-400}" python3 benchmarks/cold_start.py --preset llama-3.2-1b --model-dir /tmp/m1b \
      --variants "${CTAX_VARIANTS:-fp16,int4}" --device cuda --energy-source nvml --out "$out/ctax" \
      > "$out/ctax.log" 2>&1; echo "cold_start rc $?"; stop_servers; cat "$out/ctax/cold_start.md" ;;
  cold)
    [ -f /tmp/m1b/config.json ] || python3 -m model_server synth /tmp/m1b --preset llama-3.2-1b --seed 0 --quiet
    # shellcheck disable=SC2086  # COLD_ARGS: extra options, e.g. --importtime (the server under -X importtime)
    timeout "${COLD_TIMEOUT:-560}" python3 benchmarks/cold_start_phases.py --model-dir /tmp/m1b --commit "$EDGE_EVAL_COMMIT" --out "$out/cold" \
      ${COLD_ARGS:-} > "$out/cold.log" 2>&1; echo "cold rc $?"; stop_servers; cat "$out/cold/cold_start_phases.md" ;;
  grid)
    g=${GRID_DIR:-out/grid}
    timeout -s INT "${GRID_SECONDS:-540}" python3 -m edge_eval bench "${GRID:-benchmarks/grids/gpu.yaml}" \
      --out "$g" --resume --quiet > "$out/grid.log" 2>&1; echo "grid rc $?"; stop_servers
    tar czf "$out/grid.tgz" --exclude='*/merged*' --exclude='*/models/*' --exclude='*/adapter' "$g"
    wc -l "$g/variants.jsonl" ;;
esac
