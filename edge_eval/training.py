"""The LoRA / QLoRA training loop of ``edge-eval adapt`` (peft adapters, plain torch AdamW).

Examples are the task's chat messages rendered with the model's own chat template (what the model
server applies to ``/v1/chat/completions``), followed by the target answer and the template's
end-of-turn; the loss covers the answer tokens only. The paper's LoRA settings (EDGE-EVAL, ACL 2026
Industry Track, §2: r=16, alpha=16, dropout 0.05, all attention and MLP projections) are the
defaults; the learning rate default is higher than the paper's 2e-4 because the default run is
short.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from edge_eval.errors import UsageError
from edge_eval.tasks.base import Item, TaskSpec

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]            # -100 on prompt tokens


@dataclass
class TrainStats:
    steps: int = 0
    tokens: int = 0              # tokens forwarded (prompt + answer, padding excluded)
    target_tokens: int = 0       # answer tokens the loss covered
    first_loss: float = math.nan
    last_loss: float = math.nan


def render_example(tokenizer: Any, task: TaskSpec, item: Item, max_length: int) -> Example | None:
    """Tokenize one item as prompt + answer; None when it has no target or does not fit."""
    target = task.target(item)
    if not target:
        return None
    msgs = task.messages(item)
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": target}],
                                             tokenize=False)
        answer = full[len(prompt):] if full.startswith(prompt) else target + (tokenizer.eos_token or "")
    else:
        prompt = "\n\n".join(m["content"] for m in msgs) + "\n\nAnswer: "
        answer = target + (tokenizer.eos_token or "")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(p_ids) + len(a_ids) > max_length:
        return None
    return Example(p_ids + a_ids, [-100] * len(p_ids) + a_ids)


def build_examples(tokenizer: Any, task: TaskSpec, items: Sequence[Item], max_length: int) -> list[Example]:
    out = [e for e in (render_example(tokenizer, task, it, max_length) for it in items) if e]
    if not out:
        raise UsageError(f"no training examples: task {task.name} items need a target "
                         f"and must fit in {max_length} tokens")
    return out


def lora_model(model: Any, rank: int, alpha: int, dropout: float, quantized: bool) -> Any:
    """Wrap ``model`` with a peft LoRA adapter on every projection it has (QLoRA: after
    ``prepare_model_for_kbit_training``)."""
    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError:
        from edge_eval.errors import missing_package
        raise missing_package("peft") from None
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in names]
    if not targets:
        raise UsageError(f"the model has none of the LoRA target modules {', '.join(LORA_TARGETS)}")
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                     task_type="CAUSAL_LM", target_modules=targets)
    return get_peft_model(model, cfg)


def train(model: Any, examples: list[Example], *, steps: int, batch_size: int, lr: float,
          pad_id: int, device: str, seed: int = 0, autocast_dtype: Any = None,
          on_step: Callable[[int, float], None] | None = None) -> TrainStats:
    """AdamW over the LoRA parameters for ``steps`` steps of ``batch_size`` examples (cycling
    through shuffled examples), linear warm-up over the first 10% then constant."""
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    # fp16 compute needs loss scaling; the scaler is a no-op otherwise
    scaler = torch.amp.GradScaler(device, enabled=autocast_dtype == torch.float16)
    stats = TrainStats()
    order: list[int] = []
    model.train()
    for step in range(steps):
        batch = []
        for _ in range(batch_size):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        if autocast_dtype is not None:
            with torch.autocast(device_type=device, dtype=autocast_dtype):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if step == 0:
            stats.first_loss = value
        stats.last_loss = value
        stats.steps += 1
        stats.tokens += int(mask.sum())
        stats.target_tokens += int((labels != -100).sum())
        if on_step is not None:
            on_step(step + 1, value)
    model.eval()
    return stats
