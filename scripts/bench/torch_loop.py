"""The timed optimizer loop both PyTorch benchmark sides share: forward (`loss_fn`), backward,
clip to norm 1, AdamW step; returns the losses and the seconds of each step."""
import time
import torch


def timed_steps(model, opt, loss_fn, steps):
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, times
